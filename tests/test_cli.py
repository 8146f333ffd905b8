"""The CLI end to end in real torchrun worlds: mp4, stats, trace, --verify, the recorded action order."""

import json

import torch

from helpers import load_latents, reference_latents, run_torchrun
from pipeline.schedule import Schedule
from pipeline.video import read_video_info

SMALL = ["--size", "64*64", "--frames_per_block", "2", "--kv_cache_blocks", "1", "--base_seed", "5"]


def test_mp4_stats_trace_and_recorded_order(tmp_path):
    mp4, stats, trace, lat = (tmp_path / n for n in ("out.mp4", "stats.json", "trace.json", "lat.pt"))
    proc = run_torchrun(
        3, "infer_multigpu.py", "--num_gpus_dit", "2", "--sample_steps", "4", "--num_blocks", "4", *SMALL,
        "--output", str(mp4), "--stats_json", str(stats), "--trace", str(trace), "--save_latents", str(lat),
        "--verify", timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # mp4: 4 blocks x 2 latent frames = 8 latent frames -> 1 + 4*7 = 29 video frames of 64x64
    assert read_video_info(str(mp4)) == (29, 64, 64)
    assert not (tmp_path / "out.mp4.part").exists()
    assert "bit-identical" in proc.stdout
    got = load_latents(lat)
    want = reference_latents(num_gpus_dit=2, sample_steps=4, num_blocks=4, size="64*64", frames_per_block=2,
                             kv_cache_blocks=1, base_seed=5)
    assert torch.equal(got, want)

    s = json.loads(stats.read_text())
    assert s["partial"] is False and s["blocks"] == 4 and s["video_frames"] == 29
    assert s["generation_seconds"] > 0 and abs(s["blocks_per_second"] - 4 / s["generation_seconds"]) < 1e-9
    roles = {r["rank"]: r["role"] for r in s["ranks"]}
    assert roles == {0: "dit", 1: "dit", 2: "vae"}
    for r in s["ranks"]:
        assert set(r) >= {"busy_seconds", "wait_seconds", "bytes_sent", "peak_rss_bytes"}
        assert r["peak_rss_bytes"] > 0
    latent_bytes = (4 * 2 * 8 * 8 + 1) * 4  # one block [C, F, h, w] float32 + its start-time stamp
    # each block makes 4 hops (s0->r1, s1->r0, s2->r1, s3->VAE); rank 0 sends steps 0 and 2, rank 1 steps 1 and 3
    assert [r["bytes_sent"]["latent"] for r in s["ranks"]] == [2 * 4 * latent_bytes, 2 * 4 * latent_bytes, 0]
    assert all(r["bytes_sent"]["kv"] == 0 for r in s["ranks"])  # per_step moves no KV

    # The run report on stderr shows the same figures as the JSON summary.
    summary = s["summary"]
    assert summary["blocks_per_second"] == s["blocks_per_second"]
    assert abs(summary["frames_per_second"] - 29 / s["generation_seconds"]) < 1e-6
    assert 0 < summary["time_to_first_block_seconds"] <= s["generation_seconds"]
    assert 0 < summary["block_latency_p50_seconds"] <= summary["block_latency_p95_seconds"] <= s["generation_seconds"]
    report = proc.stderr[proc.stderr.index("run report:"):]
    assert f"{s['blocks_per_second']:.2f} blocks/s" in report and f"{summary['frames_per_second']:.1f} frames/s" in report
    assert f"p50 {summary['block_latency_p50_seconds'] * 1000:.0f} ms" in report
    for r in summary["ranks"]:
        row = next(ln for ln in report.splitlines() if ln.split()[:2] == [str(r["rank"]), r["role"]])
        assert f"{r['busy_pct']:5.1f}%" in row and f"{r['wait_pct']:5.1f}%" in row

    events = json.loads(trace.read_text())["traceEvents"]
    assert {e["tid"] for e in events if e["ph"] == "X"} == {0, 1, 2}
    assert (tmp_path / "trace.png").stat().st_size > 10_000

    # The trace shows the schedule's computes, in list order, on each DiT rank.
    lists = Schedule(2, 4, 4, "per_step").rank_lists()
    for rank in (0, 1):
        ran = [(e["args"]["block"], e["args"]["step"]) for e in events
               if e["ph"] == "X" and e["tid"] == rank and e["cat"] == "compute"]
        assert ran == [(a.block, a.step) for a in lists[rank] if a.kind == "compute"]


def test_broadcast_counts_kv_bytes(tmp_path):
    stats = tmp_path / "s.json"
    proc = run_torchrun(
        4, "infer_multigpu.py", "--num_gpus_dit", "3", "--sample_steps", "5", "--num_blocks", "2", *SMALL,
        "--kv_sync", "broadcast", "--stats_json", str(stats), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = json.loads(stats.read_text())
    # slot = layers x (k, v) x block tokens x heads x head_dim x 4 bytes; tiny model: 6 x 2 x (2*4*4) x 4 x 32 x 4
    slot = 6 * 2 * 32 * 4 * 32 * 4
    sink = 6 * 2 * 16 * 4 * 32 * 4  # the sink tokens, synced once from rank 0 after prefill
    kv = [r["bytes_sent"]["kv"] for r in s["ranks"]]
    # steps 0,3 on rank 0, 1,4 on rank 1, 2 on rank 2; each broadcast reaches the 2 other DiT ranks; 2 blocks
    assert kv == [2 * 2 * 2 * slot + 2 * sink, 2 * 2 * 2 * slot, 2 * 1 * 2 * slot, 0]


def test_image_sink_is_vae_encoded_and_exact(tmp_path):
    """--image: every DiT rank VAE-encodes the reference image into the sink; distributed == reference, and the
    image really conditions the output (differs from the seeded sink)."""
    import imageio.v3 as iio
    import numpy as np

    img = tmp_path / "ref.png"
    yy, xx = np.mgrid[0:48, 0:40]
    iio.imwrite(img, np.stack([xx * 6, yy * 5, (xx + yy) * 3], axis=-1).astype(np.uint8))
    lat = tmp_path / "lat.pt"
    proc = run_torchrun(3, "infer_multigpu.py", "--num_gpus_dit", "2", "--sample_steps", "3", "--num_blocks", "2",
                        *SMALL, "--image", str(img), "--save_latents", str(lat), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = dict(num_gpus_dit=2, sample_steps=3, num_blocks=2, size="64*64", frames_per_block=2, kv_cache_blocks=1,
               base_seed=5)
    with_image = reference_latents(image=str(img), **cfg)
    assert torch.equal(load_latents(lat), with_image)
    assert not torch.equal(with_image, reference_latents(**cfg))

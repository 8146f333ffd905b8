"""Failure behaviour in real torchrun worlds: one clear line per rank before any collective, bounded waits,
interrupts that leave a playable partial mp4, flat memory on long streams."""

import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import ROOT, env, load_latents, run_torchrun, torchrun_cmd
from pipeline.vae import TINY_VAE_CONFIG, build_vae
from pipeline.video import read_video_info
from pipeline.wan_dit import TINY_TRANSFORMER_CONFIG

SMALL = ["--size", "64*64", "--frames_per_block", "2", "--kv_cache_blocks", "1", "--sample_steps", "2",
         "--num_blocks", "2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Local diffusers checkpoints: the tiny pair, and a transformer that does not fit the tiny VAE."""
    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("ckpt")
    from pipeline.wan_dit import build_transformer

    build_transformer(None, seed=42).save_pretrained(root / "good" / "transformer")
    build_vae(None, seed=42).save_pretrained(root / "good" / "vae")
    WanTransformer3DModel(**{**TINY_TRANSFORMER_CONFIG, "in_channels": 16, "out_channels": 16}).save_pretrained(
        root / "wide")
    (root / "empty").mkdir()
    return root


CASES = {
    # name: (nproc, extra args, expected message fragment)
    "world_too_small": (2, ["--num_gpus_dit", "2"], "world size is 2 but --num_gpus_dit 2 needs 3 processes"),
    "world_too_large": (3, ["--num_gpus_dit", "1"], "world size is 3 but --num_gpus_dit 1 needs 2 processes"),
    "no_dit_ranks": (2, ["--num_gpus_dit", "0"], "--num_gpus_dit must be >= 1"),
    "zero_steps": (2, ["--num_gpus_dit", "1", "--sample_steps", "0"], "--sample_steps must be >= 1"),
    "negative_blocks": (2, ["--num_gpus_dit", "1", "--num_blocks", "-1"], "--num_blocks must be >= 1"),
    "zero_frames": (2, ["--num_gpus_dit", "1", "--frames_per_block", "0"], "--frames_per_block must be >= 1"),
    "zero_cache": (2, ["--num_gpus_dit", "1", "--kv_cache_blocks", "0"], "--kv_cache_blocks must be >= 1"),
    "size_not_multiple": (2, ["--num_gpus_dit", "1", "--size", "100*100"], "positive multiples of 16"),
    "size_garbage": (2, ["--num_gpus_dit", "1", "--size", "big"], "--size must look like H*W"),
    "unknown_policy": (2, ["--num_gpus_dit", "1", "--kv_sync", "gossip"], "argument --kv_sync: invalid choice"),
    "zero_timeout": (2, ["--num_gpus_dit", "1", "--comm_timeout", "0"], "--comm_timeout must be > 0"),
    "unwritable_output": (2, ["--num_gpus_dit", "1", "--output", "/proc/tpp/out.mp4"], "cannot write to directory"),
    "missing_transformer": (2, ["--num_gpus_dit", "1", "--transformer_path", "/nonexistent/wan"],
                            "--transformer_path: checkpoint directory /nonexistent/wan does not exist"),
    "missing_image": (2, ["--num_gpus_dit", "1", "--image", "/nonexistent.png"], "--image /nonexistent.png does not"),
    "not_a_checkpoint": (2, ["--num_gpus_dit", "1", "--vae_path", "{ckpt}/empty"], "has no config.json"),
    "mismatched_checkpoints": (2, ["--num_gpus_dit", "1", "--transformer_path", "{ckpt}/wide", "--vae_path",
                                   "{ckpt}/good"], "transformer in_channels (16) != VAE latent channels z_dim (4)"),
}


@pytest.fixture(scope="module")
def invalid_runs(checkpoints):
    def launch(item):
        name, (nproc, extra, _) = item
        args = [a.replace("{ckpt}", str(checkpoints)) for a in SMALL + extra]
        # A rank waiting for a collective that never comes would run into this bound (TimeoutExpired).
        return name, run_torchrun(nproc, "infer_multigpu.py", *args, timeout=120)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(launch, CASES.items()))


@pytest.mark.parametrize("name", list(CASES))
def test_invalid_input_one_line_per_rank(invalid_runs, name):
    nproc, _, fragment = CASES[name]
    proc = invalid_runs[name]
    assert proc.returncode != 0
    for rank in range(nproc):
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"[rank {rank}] error:")]
        assert len(lines) == 1 and fragment in lines[0], proc.stderr[-3000:]
    assert "]: Traceback" not in proc.stderr  # no worker traceback (torchrun's own summary may follow)


def test_local_checkpoints_load_through_the_same_path(checkpoints, tmp_path):
    """A diffusers-format directory with the tiny weights gives exactly the seeded default's output."""
    out_a, out_b = tmp_path / "a.pt", tmp_path / "b.pt"
    common = ["--num_gpus_dit", "1", *SMALL, "--base_seed", "42"]
    a = run_torchrun(2, "infer_multigpu.py", *common, "--save_latents", str(out_a), timeout=180)
    b = run_torchrun(2, "infer_multigpu.py", *common, "--transformer_path", str(checkpoints / "good"),
                     "--vae_path", str(checkpoints / "good"), "--save_latents", str(out_b), timeout=180)
    assert a.returncode == 0 and b.returncode == 0, b.stderr[-3000:]
    assert torch.equal(load_latents(out_a), load_latents(out_b))
    assert TINY_VAE_CONFIG["z_dim"] == TINY_TRANSFORMER_CONFIG["in_channels"]


def _expected_frames(blocks: int, frames_per_block: int = 2) -> int:
    return 1 + 4 * (blocks * frames_per_block - 1) if blocks else 0


def _check_partial(tmp_path, stderr):
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["partial"] is True
    blocks = stats["blocks"]
    assert blocks >= 1, stderr[-3000:]
    assert read_video_info(str(tmp_path / "out.mp4")) == (_expected_frames(blocks), 64, 64)
    assert not (tmp_path / "out.mp4.part").exists()
    return blocks


STREAM = ["--num_gpus_dit", "2", "--sample_steps", "4", "--size", "64*64", "--frames_per_block", "2",
          "--kv_cache_blocks", "2", "--simulate_step_ms", "30"]


def test_rank_killed_mid_stream(tmp_path):
    # The job must end by itself: a hang would run into the subprocess bound (TimeoutExpired).
    proc = run_torchrun(3, "infer_multigpu.py", *STREAM, "--num_blocks", "40", "--output", str(tmp_path / "out.mp4"),
                        "--stats_json", str(tmp_path / "stats.json"), timeout=90,
                        extra_env={"TPP_FAULT": "rank=1,block=8,step=1,action=exit"})
    assert proc.returncode != 0
    assert "[rank 2]" in proc.stderr  # the VAE rank says what it kept
    assert _check_partial(tmp_path, proc.stderr) < 40


def test_rank_raising_reports_rank_and_action(tmp_path):
    proc = run_torchrun(3, "infer_multigpu.py", *STREAM, "--num_blocks", "20", timeout=180,
                        extra_env={"TPP_FAULT": "rank=0,block=3,step=2,action=raise"})
    assert proc.returncode != 0
    assert "[rank 0] error: rank 0 failed at compute(b3,s2): InjectedFault" in proc.stderr


def test_rank_stalled_mid_stream(tmp_path):
    """A SIGSTOPped rank never answers; its peers give up after --comm_timeout and the job ends."""
    timeout = 5
    # The bound, comm_timeout + 30 s, counted from launch (start-up included): a job that does not end
    # by then fails with TimeoutExpired. The peer gives up after comm_timeout and continues the stopped
    # process so it can act on torchrun's SIGTERM.
    proc = run_torchrun(3, "infer_multigpu.py", *STREAM, "--num_blocks", "40", "--comm_timeout", str(timeout),
                        "--output", str(tmp_path / "out.mp4"), "--stats_json", str(tmp_path / "stats.json"),
                        timeout=timeout + 30, extra_env={"TPP_FAULT": "rank=0,block=6,step=0,action=stall"})
    assert proc.returncode != 0
    # Whoever gives up first names itself, the peer, the block and the step it waited for.
    assert re.search(rf"\[rank [12]\] error: rank [12] waited {timeout}s for the latent of block \d+ after step \d+ "
                     r"from rank [01]", proc.stderr), proc.stderr[-3000:]
    _check_partial(tmp_path, proc.stderr)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_playable_partial_mp4(tmp_path, sig):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM to torchrun alone."""
    cmd = torchrun_cmd(3, "infer_multigpu.py", *STREAM, "--num_blocks", "0", "--output", str(tmp_path / "out.mp4"),
                       "--stats_json", str(tmp_path / "stats.json"), "--save_latents", str(tmp_path / "lat.pt"))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    part = tmp_path / "out.mp4.part"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (part.exists() and part.stat().st_size > 4096):
        time.sleep(0.2)
    time.sleep(1.0)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "interrupted" in err, err[-3000:]
    blocks = _check_partial(tmp_path, err)
    saved = torch.load(tmp_path / "lat.pt")
    assert saved["partial"] is True and saved["latents"].shape[1] == 2 * blocks


def test_memory_flat_over_a_long_stream(tmp_path):
    def peak(blocks):
        stats = tmp_path / f"s{blocks}.json"
        proc = run_torchrun(3, "infer_multigpu.py", "--num_gpus_dit", "2", "--sample_steps", "2", "--size", "64*64",
                            "--frames_per_block", "1", "--kv_cache_blocks", "2", "--num_blocks", str(blocks),
                            "--output", str(tmp_path / f"v{blocks}.mp4"), "--stats_json", str(stats), timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return {r["rank"]: r["peak_rss_bytes"] for r in json.loads(stats.read_text())["ranks"]}

    short, long = peak(40), peak(400)
    for rank in short:
        assert long[rank] <= 1.10 * short[rank], (rank, short[rank], long[rank])


def test_reference_mode_interrupt_exit_code_and_partial_video(tmp_path):
    """--reference (one process): Ctrl-C finalises the mp4 and exits 130."""
    import sys

    cmd = [sys.executable, str(ROOT / "infer_multigpu.py"), "--reference", *STREAM, "--num_blocks", "0",
           "--output", str(tmp_path / "out.mp4"), "--stats_json", str(tmp_path / "stats.json")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = tmp_path / "out.mp4.part"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not (part.exists() and part.stat().st_size > 4096):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    _check_partial(tmp_path, err)

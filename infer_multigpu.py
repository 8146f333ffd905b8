#!/usr/bin/env python
"""Streaming block-causal video generation with timestep-forcing pipeline parallelism.

    torchrun --nproc_per_node=N+1 infer_multigpu.py --num_gpus_dit N --sample_steps S --output out.mp4
    python infer_multigpu.py --reference --num_gpus_dit N --sample_steps S --save_latents ref.pt

Ranks 0..N-1 are DiT ranks (step i of every block runs on rank i % N), rank N decodes with the VAE.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from datetime import timedelta

import torch

from pipeline.config import GenerationConfig, parse_args, validate

log = logging.getLogger("tpp")


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


def _raise_interrupted(signum, _frame):
    raise Interrupted(signum)


def fail(rank: int | None, message: str, code: int = 2) -> int:
    who = f"[rank {rank}] " if rank is not None else ""
    print(f"{who}error: {message}", file=sys.stderr, flush=True)
    return code


def pick_device(cfg: GenerationConfig) -> tuple[torch.device, str]:
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not want_cuda:
        return torch.device("cpu"), "gloo"
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available on this machine")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) here: NCCL needs one GPU per rank"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank), "nccl"


def write_json_atomic(obj, path: str) -> None:
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def build_stats(cfg, generation_seconds, output, rank_summaries, partial=False) -> dict:
    blocks = output.blocks
    return {
        "partial": partial,
        "config": json.loads(cfg.to_json()),
        "generation_seconds": generation_seconds,
        "blocks": blocks,
        "blocks_per_second": blocks / generation_seconds if generation_seconds > 0 else 0.0,
        "video_frames": output.video_frames,
        "ranks": rank_summaries,
    }


# ---------------------------------------------------------------------------------------------------------------
def run_reference(cfg: GenerationConfig) -> int:
    from pipeline.components import load_components
    from pipeline.output import BlockOutput
    from pipeline.reference import reference_blocks

    device = torch.device("cuda" if cfg.device == "cuda" else "cpu")
    comps = load_components(cfg, device)
    output = BlockOutput(cfg, device)
    start = time.perf_counter()
    partial = True
    try:
        for block, latent in reference_blocks(cfg, comps):
            output.add(block, latent)
        partial = False
    except (KeyboardInterrupt, Interrupted) as e:
        code = getattr(e, "exit_code", 130)
        log.warning("interrupted after %d blocks; finalising outputs", output.blocks)
        return code
    finally:
        seconds = time.perf_counter() - start
        written = output.finish(partial=partial)
        if cfg.stats_json:
            write_json_atomic(build_stats(cfg, seconds, output, [], partial), cfg.stats_json)
        for k, v in written.items():
            log.info("wrote %s: %s", k, v)
    return 0


def run_distributed(cfg: GenerationConfig) -> int:
    import torch.distributed as dist

    from pipeline.components import block_shape, load_components
    from pipeline.output import BlockOutput
    from pipeline.runtime import CommTimeout, RankStats, run_dit_rank, run_vae_rank
    from pipeline.schedule import Schedule

    rank = int(os.environ["RANK"])
    n = cfg.num_gpus_dit
    is_vae = rank == n
    if is_vae:  # the VAE rank finalises the video on Ctrl-C / SIGTERM
        signal.signal(signal.SIGINT, _raise_interrupted)
        signal.signal(signal.SIGTERM, _raise_interrupted)
    else:  # DiT ranks hold nothing worth saving: die at once instead of finishing a blocking wait
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    device, backend = pick_device(cfg)
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.comm_timeout))
    schedule = Schedule(n, cfg.sample_steps, None if cfg.endless else cfg.num_blocks, cfg.kv_sync,
                        cfg.schedule, cfg.max_inflight or None)
    kv_group = dist.new_group(schedule.sync_group) if schedule.sync_group else None  # every rank calls new_group
    stats = RankStats(rank, "vae" if is_vae else "dit")
    if rank == 0:
        log.info(schedule.describe())

    if not is_vae:
        comps = load_components(cfg, device)
        try:
            run_dit_rank(rank, cfg, comps, schedule, kv_group, stats, 0.0)
        except CommTimeout as e:
            return fail(rank, str(e), 1)
        _gather(stats, n)
        dist.destroy_process_group()
        return 0

    # ---- VAE rank
    output = BlockOutput(cfg, device, keep_latents=cfg.save_latents is not None or cfg.verify)
    shape = block_shape(cfg)
    seconds, partial, code = 0.0, True, 0
    try:
        seconds = run_vae_rank(cfg, shape, device, torch.float32, schedule, stats, output)
        partial = False
    except Interrupted as e:
        print(f"[rank {rank}] interrupted ({e}) after {output.blocks} blocks: finalising outputs", file=sys.stderr)
        code = e.exit_code
    except CommTimeout as e:
        code = fail(rank, str(e), 1)
    except Exception as e:  # a peer died: keep what we have
        code = fail(rank, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                          f"(a peer rank probably failed; see its message)", 1)
    written = output.finish(partial=partial)
    summaries = [stats.summary()]
    timelines = {rank: stats.timeline}
    if not partial:
        gathered = _gather(stats, n)
        summaries = [g["summary"] for g in gathered]
        timelines = {g["summary"]["rank"]: g["timeline"] for g in gathered}
    if cfg.stats_json:
        write_json_atomic(build_stats(cfg, seconds, output, summaries, partial), cfg.stats_json)
        written["stats_json"] = cfg.stats_json
    if cfg.trace:
        from pipeline.trace import write_chrome_trace, write_gantt_png

        roles = {r: ("vae" if r == n else "dit") for r in timelines}
        write_chrome_trace(timelines, cfg.trace, roles)
        write_gantt_png(timelines, os.path.splitext(cfg.trace)[0] + ".png", schedule.describe(), roles)
        written["trace"] = cfg.trace
    for k, v in written.items():
        log.info("wrote %s: %s%s", k, v, " (partial)" if partial else "")
    if not partial:
        log.info("%d blocks in %.2fs: %.2f blocks/s", output.blocks, seconds, output.blocks / max(seconds, 1e-9))
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # peers may be gone: do not wait in process-group teardown
    if cfg.verify:
        _verify(cfg, output, device)
    dist.destroy_process_group()
    return 0


def _gather(stats, vae_rank):
    import torch.distributed as dist

    payload = {"summary": stats.summary(), "timeline": stats.timeline}
    out = [None] * dist.get_world_size() if dist.get_rank() == vae_rank else None
    dist.gather_object(payload, out, dst=vae_rank)
    return out


def _verify(cfg, output, device):
    from pipeline.components import load_components
    from pipeline.reference import reference_blocks

    got = output.all_latents()
    comps = load_components(cfg, device)
    want = torch.cat([x.to("cpu", torch.float32) for _, x in reference_blocks(cfg, comps)], dim=1)
    diff = (got - want).abs().max().item()
    same = torch.equal(got, want)
    print(f"verify: max abs difference vs single-process reference = {diff:.3g}"
          f"{' (bit-identical)' if same else ''}", flush=True)


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
    except SystemExit as e:  # argparse already printed one line
        return int(e.code or 0)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    if cfg.reference:
        err = validate(cfg, None)
        if err:
            return fail(None, err)
        signal.signal(signal.SIGTERM, _raise_interrupted)
        return run_reference(cfg)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return fail(None, "not launched by torchrun (RANK/WORLD_SIZE unset): use "
                    f"torchrun --nproc_per_node={cfg.num_gpus_dit + 1} infer_multigpu.py ... or add --reference")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    err = validate(cfg, world)
    if err:
        return fail(rank, err)
    return run_distributed(cfg)


if __name__ == "__main__":
    sys.exit(main())

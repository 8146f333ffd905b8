"""One distributed generation in the current torch.distributed world (the CLI calls it once; a test world can
call it for a whole sweep of configurations, amortising process start-up)."""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .components import block_shape, load_components
from .config import GenerationConfig
from .messages import error, say
from .output import BlockOutput
from .report import format_report, summarize
from .runtime import CommTimeout, DitRank, Interrupted, RankFailure, RankStats, StopRequest, receive_blocks
from .schedule import Schedule

log = logging.getLogger("tpp")


def install_signal_handlers(is_vae: bool) -> None:
    if is_vae:  # the VAE rank finalises the video on Ctrl-C / SIGTERM, at the next block boundary
        signal.signal(signal.SIGINT, StopRequest.handler)
        signal.signal(signal.SIGTERM, StopRequest.handler)
    else:  # DiT ranks hold nothing worth saving: die at once rather than after a blocking wait returns
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pick_device(cfg: GenerationConfig) -> tuple[torch.device, str]:
    """cuda + nccl (one GPU per LOCAL_RANK) when asked or available, else cpu + gloo."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not want_cuda:
        return torch.device("cpu"), "gloo"
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda but CUDA is not available on this machine")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node: "
            "NCCL needs one GPU per rank"
        )
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank), "nccl"


def init_distributed(cfg: GenerationConfig) -> torch.device:
    device, backend = pick_device(cfg)
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.comm_timeout), **kwargs)
        # Tear the group down before the interpreter does: a process group destroyed during interpreter
        # shutdown can abort the process ("terminate called without an active exception").
        atexit.register(_destroy_if_initialized)
    return device


def _destroy_if_initialized() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wake_local_peers() -> None:
    """Before a rank exits because a peer stopped answering: SIGCONT the other workers of this torchrun agent.

    torchrun answers a failed worker by sending SIGTERM to the rest and SIGKILL 30 s later (on this path it
    ignores --shutdown-timeout). A *stopped* process (SIGSTOP, a frozen container) cannot act on the SIGTERM
    until it is continued, so it would hold the whole job those 30 s. Continuing it lets the SIGTERM end it at
    once; for a running process SIGCONT does nothing."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    me, parent = os.getpid(), os.getppid()
    try:
        with open(f"/proc/{parent}/task/{parent}/children") as f:
            siblings = [int(pid) for pid in f.read().split()]
    except OSError:
        return
    for pid in siblings:
        if pid != me:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass


def write_json_atomic(obj, path: str) -> None:
    tmp = path + ".part"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


@dataclass
class RunResult:
    exit_code: int = 0
    partial: bool = False
    stats: dict = field(default_factory=dict)
    written: dict = field(default_factory=dict)
    output: BlockOutput | None = None


def build_stats(cfg: GenerationConfig, seconds: float, output: BlockOutput, ranks: list, partial: bool) -> dict:
    blocks = output.blocks
    return {
        "partial": partial,
        "config": json.loads(cfg.to_json()),
        "generation_seconds": seconds,
        "blocks": blocks,
        "blocks_per_second": blocks / seconds if seconds > 0 else 0.0,
        "video_frames": output.video_frames,
        "ranks": ranks,
    }


def prepare(cfg: GenerationConfig):
    """The schedule and the KV process group (every rank must create the group, in the same order)."""
    schedule = Schedule(cfg.num_gpus_dit, cfg.sample_steps, None if cfg.endless else cfg.num_blocks, cfg.kv_sync,
                        cfg.schedule, cfg.max_inflight or None, cfg.sink_refresh_block)
    kv_group = dist.new_group(schedule.sync_group) if schedule.sync_group else None
    if dist.get_rank() == 0:
        log.info(schedule.describe())
    return schedule, kv_group


def finish_dit_rank(cfg: GenerationConfig, device, schedule: Schedule, kv_group) -> RunResult:
    """A DiT rank's whole part: build, prefill, follow the list, send its stats to the VAE rank."""
    rank = dist.get_rank()
    stats = RankStats(rank, "dit")
    try:
        try:  # models, caches, prefill, the one-time conditioning sync
            runner = DitRank(rank, cfg, load_components(cfg, device), schedule, kv_group, stats)
        except Exception as e:  # a checkpoint that will not load, out of memory, a peer gone during setup...
            raise RankFailure(f"rank {rank} failed during setup: {type(e).__name__}: {e}") from e
        runner.run()
    except (CommTimeout, RankFailure) as e:
        error(str(e), rank)
        log.debug("details", exc_info=True)
        if isinstance(e, CommTimeout):
            wake_local_peers()
        return RunResult(exit_code=1, partial=True)
    gather_stats(stats, schedule.vae_rank)
    return RunResult()


def generate_distributed(cfg: GenerationConfig, device: torch.device) -> RunResult:
    """Run one generation. Every rank of the world calls this with the same ``cfg`` (world size N + 1).
    The VAE rank's result carries the outputs and stats; DiT ranks return an empty result."""
    schedule, kv_group = prepare(cfg)
    if dist.get_rank() < cfg.num_gpus_dit:
        return finish_dit_rank(cfg, device, schedule, kv_group)
    return _vae_rank(cfg, device, schedule)


def _vae_rank(cfg: GenerationConfig, device, schedule: Schedule) -> RunResult:
    rank, n = schedule.vae_rank, cfg.num_gpus_dit
    stats = RankStats(rank, "vae")
    try:
        output = BlockOutput(cfg, device, keep_latents=cfg.save_latents is not None or cfg.verify)
    except Exception as e:  # the VAE checkpoint will not load, ffmpeg cannot start, ...
        error(f"rank {rank} failed during setup: {type(e).__name__}: {e}", rank)
        return RunResult(exit_code=1, partial=True)
    result = RunResult(partial=True, output=output)
    try:
        for block, latent in receive_blocks(cfg, block_shape(cfg), device, torch.float32, schedule, stats):
            output.add(block, latent, latency=stats.latencies[-1] if stats.latencies else None)
        result.partial = False
    except Interrupted as e:
        say(f"interrupted ({e}) after {output.blocks} blocks: finalising outputs", rank)
        result.exit_code = e.exit_code
    except CommTimeout as e:
        error(str(e), rank)
        wake_local_peers()
        result.exit_code = 1
    except Exception as e:  # a peer died mid-stream: keep what has arrived
        first = str(e).splitlines()[0] if str(e) else ""
        error(f"stopped after {output.blocks} blocks ({type(e).__name__}: {first}); "
              "if a DiT rank failed, its own message says why", rank)
        log.debug("details", exc_info=True)
        result.exit_code = 1
    result.written = output.finish(partial=result.partial)
    seconds = stats.generation_seconds
    summaries, timelines = [stats.summary()], {rank: stats.timeline}
    if not result.partial:
        gathered = gather_stats(stats, n)
        summaries = [g["summary"] for g in gathered]
        timelines = {g["summary"]["rank"]: g["timeline"] for g in gathered}
    result.stats = build_stats(cfg, seconds, output, summaries, result.partial)
    if not result.partial:
        result.stats["summary"] = summarize(result.stats, stats.latencies, stats.first_block_seconds)
    result.stats["timelines"] = timelines
    if cfg.stats_json:
        write_json_atomic({k: v for k, v in result.stats.items() if k != "timelines"}, cfg.stats_json)
        result.written["stats_json"] = cfg.stats_json
    if cfg.trace:
        from .trace import write_chrome_trace, write_gantt_png

        roles = {r: ("vae" if r == n else "dit") for r in timelines}
        write_chrome_trace(timelines, cfg.trace, roles)
        write_gantt_png(timelines, os.path.splitext(cfg.trace)[0] + ".png", schedule.describe(), roles)
        result.written["trace"] = cfg.trace
    for k, v in result.written.items():
        log.info("wrote %s: %s%s", k, v, " (partial)" if result.partial else "")
    if not result.partial:
        log.info("%s", format_report(result.stats["summary"], output.blocks, output.video_frames, seconds))
    return result


def gather_stats(stats: RankStats, vae_rank: int):
    payload = {"summary": stats.summary(), "timeline": stats.timeline}
    out = [None] * dist.get_world_size() if dist.get_rank() == vae_rank else None
    dist.gather_object(payload, out, dst=vae_rank)
    return out



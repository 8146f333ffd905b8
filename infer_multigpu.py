#!/usr/bin/env python
"""Streaming block-causal video generation with timestep-forcing pipeline parallelism.

    torchrun --nproc_per_node=N+1 infer_multigpu.py --num_gpus_dit N --sample_steps S --output out.mp4
    python infer_multigpu.py --reference --num_gpus_dit N --sample_steps S --save_latents ref.pt

Ranks 0..N-1 are DiT ranks (step i of every block runs on rank i % N), rank N decodes with the VAE.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import torch

from pipeline.config import GenerationConfig, parse_args, validate
from pipeline.messages import error, say

log = logging.getLogger("tpp")


def fail(rank: int | None, message: str, code: int = 2) -> int:
    error(message, rank)
    return code


def run_reference(cfg: GenerationConfig) -> int:
    """One process: a loop over the Python API's generator that writes the outputs."""
    from pipeline.api import stream
    from pipeline.distributed import build_stats, write_json_atomic
    from pipeline.output import BlockOutput
    from pipeline.runtime import Interrupted, StopRequest

    device = torch.device("cuda" if cfg.device == "cuda" else "cpu")
    output = BlockOutput(cfg, device, decode=False)
    blocks = stream(cfg, decode=cfg.output is not None)  # setup (models, cache prefill) happens here
    partial, code, start = True, 0, time.perf_counter()
    try:
        for block in blocks:
            output.add(block.index, block.latent, block.frames)  # a block computed is a block written
            StopRequest.check()
        partial = False
    except Interrupted as e:
        code = e.exit_code
        say(f"interrupted after {output.blocks} blocks: finalising outputs")
    seconds = time.perf_counter() - start
    written = output.finish(partial=partial)
    if cfg.stats_json:
        write_json_atomic(build_stats(cfg, seconds, output, [], partial), cfg.stats_json)
        written["stats_json"] = cfg.stats_json
    for k, v in written.items():
        log.info("wrote %s: %s%s", k, v, " (partial)" if partial else "")
    return code


def run_distributed(cfg: GenerationConfig) -> int:
    import torch.distributed as dist

    from pipeline.distributed import generate_distributed, init_distributed, install_signal_handlers

    rank = int(os.environ["RANK"])
    install_signal_handlers(is_vae=rank == cfg.num_gpus_dit)
    try:
        device = init_distributed(cfg)
    except RuntimeError as e:
        return fail(rank, str(e))
    result = generate_distributed(cfg, device)
    if result.exit_code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(result.exit_code)  # peers may be gone: never wait in process-group teardown
    if cfg.verify and result.output is not None:
        verify(cfg, result.output.all_latents(), device)
    dist.destroy_process_group()
    return 0


def verify(cfg: GenerationConfig, got: torch.Tensor, device) -> None:
    from pipeline.components import load_components
    from pipeline.reference import reference_blocks

    comps = load_components(cfg, device)
    want = torch.cat([x.to("cpu", torch.float32) for _, x in reference_blocks(cfg, comps)], dim=1)
    diff = (got - want).abs().max().item()
    same = " (bit-identical)" if torch.equal(got, want) else ""
    print(f"verify: max abs difference vs single-process reference = {diff:.3g}{same}", flush=True)


def main(argv=None) -> int:
    try:
        cfg = parse_args(argv)
    except SystemExit as e:  # argparse printed its one line
        return int(e.code or 0)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    from pipeline.memory import pin_malloc_thresholds

    pin_malloc_thresholds()  # flat memory on long streams
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    if cfg.reference:
        err = validate(cfg, None)
        if err:
            return fail(None, err)
        from pipeline.runtime import StopRequest

        signal.signal(signal.SIGINT, StopRequest.handler)
        signal.signal(signal.SIGTERM, StopRequest.handler)
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

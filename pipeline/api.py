"""Python API: a generator of decoded frame blocks, as they are produced.

    from pipeline.api import stream
    for block in stream(num_blocks=8, sample_steps=4):      # in a notebook: one process
        show(block.frames)                                  # [T, H, W, 3] uint8, as soon as the block exists

Under torchrun (``RANK``/``WORLD_SIZE`` set) every rank calls ``stream`` with the same settings: DiT ranks run
their part of the pipeline and yield nothing; the VAE rank yields the blocks in order as they arrive. Outside
torchrun it generates in this process, which is what every distributed run equals bit for bit. Writing files is
the caller's business (``infer_multigpu.py --reference`` is a loop over this generator that writes them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch

from .config import GenerationConfig, validate
from .memory import pin_malloc_thresholds
from .vae import StreamingDecoder, build_vae, to_uint8_frames


@dataclass
class FrameBlock:
    index: int
    latent: torch.Tensor  # [C, F, h, w] final denoised latent of the block
    frames: np.ndarray | None  # [T, H, W, 3] uint8 video frames, None when decode=False


def stream(cfg: GenerationConfig | None = None, *, decode: bool = True, **overrides) -> Iterator[FrameBlock]:
    """Set up now (models, caches, process group), then return an iterator of :class:`FrameBlock` in order.
    ``overrides`` are :class:`GenerationConfig` fields. Raises ``ValueError`` on invalid settings."""
    cfg = replace(cfg or GenerationConfig(), **overrides)
    pin_malloc_thresholds()
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ and not cfg.reference
    err = validate(cfg, int(os.environ["WORLD_SIZE"]) if distributed else None)
    if err:
        raise ValueError(err)
    latents = _distributed_latents(cfg) if distributed else _local_latents(cfg)
    decoder = None
    if decode and latents is not None:
        device = torch.device("cuda" if cfg.device == "cuda" or torch.cuda.is_available() and cfg.device == "auto"
                              else "cpu")
        decoder = StreamingDecoder(build_vae(cfg.vae_path, cfg.base_seed, device=device))
    return _frames(latents or iter(()), decoder)


def _frames(latents, decoder) -> Iterator[FrameBlock]:
    for index, latent in latents:
        frames = to_uint8_frames(decoder.decode(latent)) if decoder is not None else None
        yield FrameBlock(index, latent, frames)


def _local_latents(cfg: GenerationConfig):
    from .components import load_components
    from .reference import reference_blocks, reference_caches

    comps = load_components(cfg, torch.device("cuda" if cfg.device == "cuda" else "cpu"))
    return reference_blocks(cfg, comps, reference_caches(cfg, comps))


def _distributed_latents(cfg: GenerationConfig):
    from .components import block_shape
    from .distributed import finish_dit_rank, gather_stats, init_distributed, prepare
    from .runtime import RankStats, receive_blocks

    device = init_distributed(cfg)
    schedule, kv_group = prepare(cfg)
    if torch.distributed.get_rank() != schedule.vae_rank:  # a DiT rank: do its part now, yield nothing
        if finish_dit_rank(cfg, device, schedule, kv_group).exit_code:
            raise RuntimeError(f"DiT rank {torch.distributed.get_rank()} failed (see its error line)")
        return None

    def vae_rank():
        stats = RankStats(schedule.vae_rank, "vae")
        yield from receive_blocks(cfg, block_shape(cfg), device, torch.float32, schedule, stats)
        gather_stats(stats, schedule.vae_rank)

    return vae_rank()

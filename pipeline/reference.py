"""The single-process sampling loop: the definition of a correct output for each KV policy.

It holds every logical cache of the policy (``per_step``: S caches; ``broadcast``: one; ``unsynced``: one per
DiT rank) and runs the steps in order. A distributed run of the same policy must equal it bit for bit.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import torch

import kv_sync

from .components import Components
from .config import GenerationConfig


def reference_caches(cfg: GenerationConfig, comps: Components) -> dict:
    """Every logical cache of the policy, prefilled with the sink."""
    return comps.new_caches(kv_sync.logical_caches(cfg.kv_sync, cfg.sample_steps, cfg.num_gpus_dit),
                            cfg.kv_cache_blocks)


def reference_blocks(cfg: GenerationConfig, comps: Components, caches: dict | None = None
                     ) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(block, final latent [C, F, h, w])`` in order; endless if ``cfg.num_blocks == 0``.
    ``caches`` (from :func:`reference_caches`) lets a caller keep setup out of a timing."""
    n, steps = cfg.num_gpus_dit, cfg.sample_steps
    caches = caches if caches is not None else reference_caches(cfg, comps)
    blocks = itertools.count() if cfg.endless else range(cfg.num_blocks)
    new_sink = None
    for b in blocks:
        if cfg.sink_refresh_block and b == cfg.sink_refresh_block:
            for cache in caches.values():  # rolling sink: every cache, at this block boundary
                comps.refresh_sink(cache, new_sink)
        x = comps.noise(b)
        for i in range(steps):
            x = comps.denoise_step(caches[kv_sync.cache_key(cfg.kv_sync, i, n)], b, i, x)
        if b == 0:
            new_sink = x[:, -1:].clone()  # block 0's last latent frame
        yield b, x

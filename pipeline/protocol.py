"""The one interface the runtime talks to: a block denoiser.

The runtime makes one call per (block, step). Anything that implements these three methods runs under every
schedule and KV policy, distributed or not; :class:`pipeline.wan_dit.WanBlockCausalDiT` (diffusers' Wan) and
:class:`pipeline.upstream_adapter.UpstreamConventionAdapter` (LiveAvatar-style noise models) are the two here.

Shapes: latents ``[C, F, H, W]`` (no batch), ``timestep`` ``[1]``, ``context`` whatever the model conditions on.
A cache is whatever ``new_cache`` returns, as long as it offers the geometry methods below and
``kv_sync.slot_views(cache, start, end)`` can see its tensors (it knows :class:`~pipeline.kv_cache.KVCache` and
the upstream list-of-dicts layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class BlockSlot:
    """Where block ``block`` lives in a cache: tokens ``[start, end)`` are its own (written by this call),
    tokens ``[0, visible)`` are what it attends to (sink + history + itself), and its first latent frame sits
    at RoPE/frame position ``frame_offset``."""

    block: int
    start: int
    end: int
    visible: int
    frame_offset: int


class BlockCache(Protocol):
    sink_tokens: int
    block_tokens: int

    def block_range(self, block: int) -> tuple[int, int]: ...
    def visible_tokens(self, block: int) -> int: ...
    def sink_range(self) -> tuple[int, int]: ...


class BlockDenoiser(Protocol):
    latent_channels: int
    frames_per_block: int
    dtype: torch.dtype
    device: torch.device

    def new_cache(self, history_blocks: int) -> BlockCache: ...

    def prefill(self, cache: BlockCache, sink_latent: torch.Tensor, context: Any) -> None:
        """Write the sink frame ``[C, 1, H, W]`` into ``cache`` (clean, frame position 0)."""

    def velocity(self, latent: torch.Tensor, timestep: torch.Tensor, cache: BlockCache, slot: BlockSlot,
                 context: Any) -> torch.Tensor:
        """Flow-matching velocity ``[C, F, H, W]`` for the block at ``slot``; writes the slot's keys/values."""


def slot_for(cache: BlockCache, block: int, frames_per_block: int) -> BlockSlot:
    start, end = cache.block_range(block)
    return BlockSlot(block, start, end, cache.visible_tokens(block), 1 + block * frames_per_block)

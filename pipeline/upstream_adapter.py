"""Run a model that follows the upstream LiveAvatar noise-model calling convention under this runtime.

The convention (what such a model's ``forward`` takes and returns)::

    preds = model(
        x=[latent],               # list of latent tensors [C, F, H, W]
        t=t,                      # [1, F]: the timestep of every frame
        context=context,          # conditioning, passed through untouched
        kv_cache=kv_cache,        # list, one dict per layer: k, v [batch, tokens, heads, head_dim],
                                  #   cond_k, cond_v [batch, cond_tokens, heads, head_dim], cond_end (int)
        current_start=s,          # absolute token offset of the block's first token (grows without bound)
        current_end=e,            # s + tokens of the block
    )                             # -> list of predictions [C, F, H, W]

A model maps absolute offsets into its ring of ``k``/``v`` tokens by ``offset % k.shape[1]``, derives frame
positions from them, and treats a call while ``cond_end == 0`` as the conditioning prefill (it fills
``cond_k``/``cond_v`` and sets ``cond_end``). :class:`UpstreamKVCache` is that layout with the geometry the
runtime and ``kv_sync`` need; :class:`UpstreamConventionAdapter` turns the model into a
:class:`pipeline.protocol.BlockDenoiser`. ``pipeline.standin`` has a small model written to this convention.
"""

from __future__ import annotations

import torch

from .protocol import BlockSlot


class UpstreamKVCache:
    """``layers``: the upstream list of per-layer dicts. Block ``b`` owns ring tokens
    ``[(b % slots) * block_tokens, ...)`` of ``k``/``v``; the sink lives in ``cond_k``/``cond_v``."""

    def __init__(self, num_layers, num_heads, head_dim, sink_tokens, block_tokens, history_blocks,
                 dtype=torch.float32, device="cpu"):
        if history_blocks < 1:
            raise ValueError(f"history_blocks must be >= 1, got {history_blocks}")
        self.sink_tokens, self.block_tokens, self.num_slots = sink_tokens, block_tokens, history_blocks + 1
        ring = self.num_slots * block_tokens

        def zeros(tokens):
            return torch.zeros(1, tokens, num_heads, head_dim, dtype=dtype, device=device)

        self.layers = [dict(k=zeros(ring), v=zeros(ring), cond_k=zeros(sink_tokens), cond_v=zeros(sink_tokens),
                            cond_end=0) for _ in range(num_layers)]

    def block_range(self, block: int) -> tuple[int, int]:
        start = (block % self.num_slots) * self.block_tokens
        return start, start + self.block_tokens

    def visible_tokens(self, block: int) -> int:
        return min(block + 1, self.num_slots) * self.block_tokens

    def sink_range(self) -> tuple[int, int]:
        return 0, self.sink_tokens

    def copy_sink_from(self, other: "UpstreamKVCache") -> None:
        for mine, theirs in zip(self.layers, other.layers):
            mine["cond_k"].copy_(theirs["cond_k"])
            mine["cond_v"].copy_(theirs["cond_v"])
            mine["cond_end"] = theirs["cond_end"]


class UpstreamConventionAdapter:
    """A :class:`~pipeline.protocol.BlockDenoiser` over an upstream-convention model."""

    def __init__(self, model, frames_per_block: int, latent_hw: tuple[int, int], *, latent_channels: int,
                 num_layers: int, num_heads: int, head_dim: int, patch: int = 2):
        self.model = model
        self.frames_per_block = frames_per_block
        self.latent_channels = latent_channels
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.tokens_per_frame = (latent_hw[0] // patch) * (latent_hw[1] // patch)
        self.block_tokens = self.tokens_per_frame * frames_per_block
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device

    def new_cache(self, history_blocks: int) -> UpstreamKVCache:
        return UpstreamKVCache(self.num_layers, self.num_heads, self.head_dim, self.tokens_per_frame,
                               self.block_tokens, history_blocks, self.dtype, self.device)

    @torch.no_grad()
    def prefill(self, cache: UpstreamKVCache, sink_latent: torch.Tensor, context) -> None:
        """Fill (or, for a rolling sink, refill) the conditioning entries: by the convention, a call made while
        ``cond_end == 0`` is the prefill."""
        for layer in cache.layers:
            layer["cond_end"] = 0
        self.model(x=[sink_latent], t=torch.zeros(1, 1, device=self.device), context=context,
                   kv_cache=cache.layers, current_start=0, current_end=self.tokens_per_frame)

    @torch.no_grad()
    def velocity(self, latent, timestep, cache: UpstreamKVCache, slot: BlockSlot, context) -> torch.Tensor:
        start = slot.block * self.block_tokens  # absolute; the model wraps it into its ring
        t = timestep.to(self.device).reshape(1, 1).expand(1, latent.shape[1])
        return self.model(x=[latent], t=t, context=context, kv_cache=cache.layers, current_start=start,
                          current_end=start + self.block_tokens)[0]

"""Rolling block-causal KV cache.

Token layout along one axis: ``[sink | slot 0 | slot 1 | ... | slot K]``. The sink (reference frame tokens) is
written once at prefill and never evicted. Block ``b`` lives in slot ``b % (K + 1)``: ``K`` blocks of history
plus the block being denoised, so memory is flat for any stream length. Keys are stored after RoPE, so the slot
order does not matter to attention (softmax over keys is order-free up to float rounding, and the reference run
uses the very same layout, so results are bit-identical).
"""

from __future__ import annotations

import torch


class KVCache:
    """One cache: ``data`` is ``[layers, 2 (k/v), sink_tokens + (history_blocks + 1) * block_tokens, heads, head_dim]``."""

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        sink_tokens: int,
        block_tokens: int,
        history_blocks: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        if history_blocks < 1:
            raise ValueError(f"history_blocks must be >= 1, got {history_blocks}")
        self.sink_tokens = sink_tokens
        self.block_tokens = block_tokens
        self.num_slots = history_blocks + 1
        total = sink_tokens + self.num_slots * block_tokens
        self.data = torch.zeros(num_layers, 2, total, num_heads, head_dim, dtype=dtype, device=device)

    @property
    def num_layers(self) -> int:
        return self.data.shape[0]

    def block_range(self, block: int) -> tuple[int, int]:
        """Token range ``[start, end)`` of block ``block``'s slot."""
        start = self.sink_tokens + (block % self.num_slots) * self.block_tokens
        return start, start + self.block_tokens

    def sink_range(self) -> tuple[int, int]:
        return 0, self.sink_tokens

    def visible_tokens(self, block: int) -> int:
        """Block ``block`` attends to the first this-many tokens: the sink, its history and itself. Slots fill in
        order, so before the ring wraps the valid tokens are a prefix; after it wraps, all of it."""
        return self.sink_tokens + min(block + 1, self.num_slots) * self.block_tokens

    def block_view(self, block: int) -> torch.Tensor:
        """``[layers, 2, block_tokens, heads, head_dim]`` view of one block's slot in every layer (not contiguous)."""
        start, end = self.block_range(block)
        return self.data[:, :, start:end]

    def copy_sink_from(self, other: "KVCache") -> None:
        start, end = self.sink_range()
        self.data[:, :, start:end] = other.data[:, :, start:end]

    def nbytes_per_block(self) -> int:
        return self.block_view(0).numel() * self.data.element_size()

"""diffusers' ``WanTransformer3DModel`` made block-causal, without forking it.

Two replacements on a stock model instance:
  * every block's self-attention (``attn1``) gets :class:`BlockCausalAttnProcessor`, which writes the current
    block's keys (after RoPE) and values into a :class:`~pipeline.kv_cache.KVCache` and attends over the cached
    sink + history + the block itself;
  * ``model.rope`` becomes :class:`FrameOffsetRotaryPosEmbed`, which places the block at its absolute frame
    index. Temporal frequencies are computed for the requested positions (no table to run off: a 10,000-block
    stream is fine); spatial ones come from the stock table.

Frame positions: the sink frame is position 0, block ``b`` covers ``1 + b*F .. 1 + (b+1)*F - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers import WanTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn

from .checkpoints import checkpoint_root, realign
from .kv_cache import KVCache
from .protocol import BlockSlot

# Tiny default: a CPU forward of one block takes tens of milliseconds. Real checkpoints load via --transformer_path.
TINY_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=4,
    out_channels=4,
    text_dim=32,
    freq_dim=32,
    ffn_dim=512,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)
ROPE_THETA = 10000.0  # WanTransformer3DModel builds its WanRotaryPosEmbed with the default theta
CONTEXT_TOKENS = 16


def build_transformer(path: str | None, seed: int, device="cpu", dtype=torch.float32) -> WanTransformer3DModel:
    """A local diffusers-format checkpoint (``path``; a ``transformer/`` subfolder is accepted) or the tiny
    config with weights drawn from ``seed`` (identical on every rank; the global RNG is left untouched)."""
    if path:
        root = checkpoint_root(path, "transformer")
        model = realign(WanTransformer3DModel.from_pretrained(root, local_files_only=True))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = WanTransformer3DModel(**TINY_TRANSFORMER_CONFIG)
    if dtype != torch.float32:
        model = model.to(dtype)
    return model.to(device).eval().requires_grad_(False)


def seeded_context(text_dim: int, seed: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Deterministic conditioning ``[1, CONTEXT_TOKENS, text_dim]`` standing in for a text encoder's output."""
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    return torch.randn(1, CONTEXT_TOKENS, text_dim, generator=g).to(device=device, dtype=dtype)


@dataclass
class _AttnTarget:
    """Where the processors read and write during the current forward (set by the wrapper, read per layer)."""

    cache: KVCache | None = None
    write: tuple[int, int] = (0, 0)
    visible: int = 0


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same arithmetic as diffusers' WanAttnProcessor so that a cached key equals the stock model's key.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class BlockCausalAttnProcessor:
    """Self-attention of one transformer layer over ``[sink | history | current block]`` from a KV cache."""

    def __init__(self, layer: int, target: _AttnTarget):
        self.layer = layer
        self.target = target

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)

        t = self.target
        layer_kv = t.cache.data[self.layer]  # [2, tokens, heads, head_dim]
        start, end = t.write
        layer_kv[0, start:end] = key[0]
        layer_kv[1, start:end] = value[0]
        keys = layer_kv[0, : t.visible].unsqueeze(0)
        values = layer_kv[1, : t.visible].unsqueeze(0)

        out = dispatch_attention_fn(query, keys, values, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class FrameOffsetRotaryPosEmbed(nn.Module):
    """Wan's 3-axis RoPE with the temporal axis starting at ``frame_offset`` (computed, not looked up)."""

    def __init__(self, stock):
        super().__init__()
        self.patch_size = stock.patch_size
        self.t_dim, self.h_dim, self.w_dim = stock.t_dim, stock.h_dim, stock.w_dim
        self.max_seq_len = stock.max_seq_len
        split = [self.t_dim, self.h_dim, self.w_dim]
        self.register_buffer("h_cos", stock.freqs_cos.split(split, dim=1)[1].clone(), persistent=False)
        self.register_buffer("w_cos", stock.freqs_cos.split(split, dim=1)[2].clone(), persistent=False)
        self.register_buffer("h_sin", stock.freqs_sin.split(split, dim=1)[1].clone(), persistent=False)
        self.register_buffer("w_sin", stock.freqs_sin.split(split, dim=1)[2].clone(), persistent=False)
        self.frame_offset = 0

    def temporal(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[len(positions), t_dim]`` exactly as diffusers' ``get_1d_rotary_pos_embed`` would give."""
        inv = 1.0 / (ROPE_THETA ** (torch.arange(0, self.t_dim, 2, dtype=torch.float64) / self.t_dim))
        angles = torch.outer(positions.to(torch.float64), inv)
        return (
            angles.cos().repeat_interleave(2, dim=1).float(),
            angles.sin().repeat_interleave(2, dim=1).float(),
        )

    def forward(self, hidden_states: torch.Tensor):
        _, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        ppf, pph, ppw = frames // p_t, height // p_h, width // p_w
        t_cos, t_sin = self.temporal(torch.arange(self.frame_offset, self.frame_offset + ppf))
        t_cos, t_sin = t_cos.to(self.h_cos.device), t_sin.to(self.h_cos.device)

        def grid(t, h, w):
            return torch.cat(
                [
                    t.view(ppf, 1, 1, -1).expand(ppf, pph, ppw, -1),
                    h[:pph].view(1, pph, 1, -1).expand(ppf, pph, ppw, -1),
                    w[:ppw].view(1, 1, ppw, -1).expand(ppf, pph, ppw, -1),
                ],
                dim=-1,
            ).reshape(1, ppf * pph * ppw, 1, -1)

        return grid(t_cos, self.h_cos, self.w_cos), grid(t_sin, self.h_sin, self.w_sin)


class WanBlockCausalDiT:
    """diffusers' Wan as a :class:`pipeline.protocol.BlockDenoiser`: one call per (block, step).

    Latents are ``[C, F, H, W]`` (no batch axis); the timestep is a ``[1]`` tensor from
    :class:`scheduler_utils.StepTable`; ``context`` is ``[1, tokens, text_dim]``.
    """

    def __init__(self, transformer: WanTransformer3DModel, frames_per_block: int, latent_hw: tuple[int, int]):
        cfg = transformer.config
        p_t, p_h, p_w = cfg.patch_size
        h, w = latent_hw
        if frames_per_block % p_t or h % p_h or w % p_w:
            raise ValueError(f"latent {frames_per_block}x{h}x{w} is not divisible by patch size {cfg.patch_size}")
        self.model = transformer
        self.frames_per_block = frames_per_block
        self.latent_channels = cfg.in_channels
        self.num_layers = len(transformer.blocks)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.attention_head_dim
        self.tokens_per_frame = (h // p_h) * (w // p_w) // p_t
        self.block_tokens = self.tokens_per_frame * frames_per_block
        self.device = next(transformer.parameters()).device
        self.dtype = next(transformer.parameters()).dtype

        self._target = _AttnTarget()
        for layer, block in enumerate(transformer.blocks):
            block.attn1.set_processor(BlockCausalAttnProcessor(layer, self._target))
        if not isinstance(transformer.rope, FrameOffsetRotaryPosEmbed):
            transformer.rope = FrameOffsetRotaryPosEmbed(transformer.rope)

    def new_cache(self, history_blocks: int) -> KVCache:
        return KVCache(
            self.num_layers,
            self.num_heads,
            self.head_dim,
            sink_tokens=self.tokens_per_frame,
            block_tokens=self.block_tokens,
            history_blocks=history_blocks,
            dtype=self.dtype,
            device=self.device,
        )

    @torch.no_grad()
    def prefill(self, cache: KVCache, sink_latent: torch.Tensor, context: torch.Tensor) -> None:
        """Write the reference frame ``[C, 1, H, W]`` into the cache's sink (clean, timestep 0, frame 0)."""
        start, end = cache.sink_range()
        self._forward(sink_latent, torch.zeros(1), cache, (start, end), end, frame_offset=0, context=context)

    @torch.no_grad()
    def velocity(
        self, latent: torch.Tensor, timestep: torch.Tensor, cache: KVCache, slot: BlockSlot, context: torch.Tensor
    ) -> torch.Tensor:
        """Flow-matching velocity ``[C, F, H, W]`` for the block at ``slot``; writes the slot in ``cache``."""
        return self._forward(latent, timestep, cache, (slot.start, slot.end), slot.visible, slot.frame_offset, context)

    def _forward(self, latent, timestep, cache, write, visible, frame_offset, context):
        self._target.cache, self._target.write, self._target.visible = cache, write, visible
        self.model.rope.frame_offset = frame_offset
        try:
            out = self.model(
                hidden_states=latent.unsqueeze(0).to(self.dtype),
                timestep=timestep.to(self.device),
                encoder_hidden_states=context,
                return_dict=False,
            )[0]
        finally:
            self._target.cache = None
        return out[0]


def block_noise(seed: int, block: int, shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Initial noise of block ``block``: a function of (seed, block) only, so any rank can draw it."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + 0x5EED + block) % (2**63))
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def seeded_sink_latent(seed: int, shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Stand-in reference frame ``[C, 1, H, W]`` when no ``--image`` is given."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + 0x51AC) % (2**63))
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

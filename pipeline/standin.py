"""A small noise model written to the upstream calling convention (see ``pipeline.upstream_adapter``).

Not a video model anyone would train: patch embedding, a per-frame timestep embedding, sinusoidal frame
positions, ``layers`` blocks of self-attention over ``[conditioning | cached history | block]`` plus an MLP, and
a projection back to latent patches. It exists so the adapter, ``kv_sync``'s upstream layout and the sink
refresh are tested against a model that owns its own cache handling, the way upstream scripts' models do.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _sinusoid(values: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles = values.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).float()


class StandInNoiseModel(nn.Module):
    def __init__(self, in_channels: int = 4, dim: int = 64, heads: int = 4, layers: int = 3, patch: int = 2,
                 context_dim: int = 32, tokens_per_frame: int = 16):
        super().__init__()
        self.in_channels, self.dim, self.heads, self.patch = in_channels, dim, heads, patch
        self.tokens_per_frame = tokens_per_frame
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.time = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.ctx = nn.Linear(context_dim, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(norm1=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), out=nn.Linear(dim, dim),
                               norm2=nn.LayerNorm(dim), mlp=nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                                                          nn.Linear(2 * dim, dim))))
            for _ in range(layers))
        self.head = nn.Linear(dim, in_channels * patch * patch)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def forward(self, x, t, context, kv_cache, current_start, current_end):
        latent = x[0]
        c, f, h, w = latent.shape
        p = self.patch
        tokens = latent.reshape(c, f, h // p, p, w // p, p).permute(1, 2, 4, 0, 3, 5).reshape(-1, c * p * p)
        per_frame = tokens.shape[0] // f
        prefill = kv_cache[0]["cond_end"] == 0
        # Frame positions: the conditioning frame is 0, block tokens start at frame 1 + start // tokens_per_frame.
        first_frame = 0 if prefill else 1 + current_start // self.tokens_per_frame
        frames = torch.arange(first_frame, first_frame + f).repeat_interleave(per_frame)
        hidden = self.embed(tokens) + _sinusoid(frames, self.dim)
        temb = self.time(_sinusoid(t[0].float(), self.dim)).repeat_interleave(per_frame, dim=0)
        hidden = (hidden + temb + self.ctx(context[0]).mean(0))[None]  # [1, tokens, dim]

        for layer, block in zip(kv_cache, self.blocks):
            q, k, v = block["qkv"](block["norm1"](hidden)).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)
            if prefill:
                layer["cond_k"][:, : k.shape[1]] = k
                layer["cond_v"][:, : v.shape[1]] = v
                keys, values = k, v
            else:
                ring = layer["k"].shape[1]
                local = current_start % ring
                layer["k"][:, local : local + k.shape[1]] = k
                layer["v"][:, local : local + v.shape[1]] = v
                valid = min(current_end, ring)
                keys = torch.cat([layer["cond_k"][:, : layer["cond_end"]], layer["k"][:, :valid]], dim=1)
                values = torch.cat([layer["cond_v"][:, : layer["cond_end"]], layer["v"][:, :valid]], dim=1)
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
            hidden = hidden + block["out"](attn.transpose(1, 2).flatten(2))
            hidden = hidden + block["mlp"](block["norm2"](hidden))
        if prefill:
            for layer in kv_cache:
                layer["cond_end"] = current_end - current_start

        out = self.head(hidden[0]).reshape(f, h // p, w // p, c, p, p).permute(3, 0, 1, 4, 2, 5)
        return [out.reshape(c, f, h, w)]


def build_standin(seed: int, latent_hw: tuple[int, int], context_dim: int, device="cpu") -> StandInNoiseModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        model = StandInNoiseModel(context_dim=context_dim, tokens_per_frame=(latent_hw[0] // 2) * (latent_hw[1] // 2))
    return model.to(device).eval().requires_grad_(False)

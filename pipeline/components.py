"""Everything a rank needs to denoise, built the same way on every rank and in the reference."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from scheduler_utils import StepTable

from .config import GenerationConfig, read_checkpoint_config
from .kv_cache import KVCache
from .protocol import BlockDenoiser, slot_for
from .vae import build_vae, encode_image, load_image, spatial_ratio_of
from .wan_dit import TINY_TRANSFORMER_CONFIG, WanBlockCausalDiT, block_noise, build_transformer, seeded_context, seeded_sink_latent


@dataclass
class Components:
    dit: BlockDenoiser
    table: StepTable
    context: torch.Tensor  # [1, tokens, text_dim]
    sink: torch.Tensor  # [C, 1, h, w]: the attention-sink reference frame
    block_shape: tuple[int, int, int, int]  # [C, F, h, w]
    device: torch.device
    seed: int
    simulate_step_s: float = 0.0

    def noise(self, block: int) -> torch.Tensor:
        return block_noise(self.seed, block, self.block_shape, device=self.device)

    def new_caches(self, keys, history_blocks: int) -> dict[int, KVCache]:
        """Caches for the logical ``keys``, each prefilled with the sink (computed once, copied)."""
        caches = {k: self.dit.new_cache(history_blocks) for k in keys}
        first = None
        for cache in caches.values():
            if first is None:
                if not self.simulate_step_s:
                    self.dit.prefill(cache, self.sink, self.context)
                first = cache
            else:
                cache.copy_sink_from(first)
        return caches

    def refresh_sink(self, cache: KVCache, sink: torch.Tensor) -> None:
        """Rolling sink: overwrite the cache's sink with ``sink`` ``[C, 1, h, w]`` (history slots untouched)."""
        if not self.simulate_step_s:
            self.dit.prefill(cache, sink, self.context)

    def denoise_step(self, cache: KVCache, block: int, step: int, latent: torch.Tensor) -> torch.Tensor:
        """Step ``step`` of block ``block``: one DiT forward (reads and writes ``cache``) and one Euler step.
        The reference loop and every DiT rank call exactly this."""
        t = self.table.timestep(step)
        if self.simulate_step_s:
            time.sleep(self.simulate_step_s)  # stands in for the forward; the rest of the step is real
            velocity = torch.zeros_like(latent)
        else:
            slot = slot_for(cache, block, self.dit.frames_per_block)
            velocity = self.dit.velocity(latent, t, cache, slot, self.context)
        return self.table.step(step, latent, velocity)


def block_shape(cfg: GenerationConfig) -> tuple[int, int, int, int]:
    """``[C, F, h, w]`` of one latent block, from the configs alone (no weights loaded)."""
    channels = TINY_TRANSFORMER_CONFIG["in_channels"]
    if cfg.transformer_path:
        channels = read_checkpoint_config(cfg.transformer_path, "transformer")[0]["in_channels"]
    ratio = spatial_ratio_of(cfg.vae_path)
    return channels, cfg.frames_per_block, cfg.height // ratio, cfg.width // ratio


def build_denoiser(cfg: GenerationConfig, device: torch.device) -> tuple[BlockDenoiser, int]:
    """The model behind the protocol, and its conditioning width."""
    c, f, h, w = block_shape(cfg)
    if cfg.model == "upstream_standin":
        from .standin import build_standin
        from .upstream_adapter import UpstreamConventionAdapter

        text_dim = TINY_TRANSFORMER_CONFIG["text_dim"]
        model = build_standin(cfg.base_seed, (h, w), text_dim, device=device)
        adapter = UpstreamConventionAdapter(model, f, (h, w), latent_channels=c, num_layers=len(model.blocks),
                                            num_heads=model.heads, head_dim=model.head_dim)
        return adapter, text_dim
    transformer = build_transformer(cfg.transformer_path, cfg.base_seed, device=device)
    return WanBlockCausalDiT(transformer, f, (h, w)), transformer.config.text_dim


def load_components(cfg: GenerationConfig, device: torch.device) -> Components:
    c, f, h, w = block_shape(cfg)
    dit, text_dim = build_denoiser(cfg, device)
    if cfg.image:  # every DiT rank encodes the same image itself: no collective, identical bits
        vae = build_vae(cfg.vae_path, cfg.base_seed, device=device)
        sink = encode_image(vae, load_image(cfg.image, cfg.height, cfg.width)).to(device)
        del vae
    else:
        sink = seeded_sink_latent(cfg.base_seed, (c, 1, h, w), device=device)
    return Components(
        dit=dit,
        table=StepTable.from_scheduler(cfg.sample_steps, cfg.sample_shift),
        context=seeded_context(text_dim, cfg.base_seed, device=device, dtype=dit.dtype),
        sink=sink,
        block_shape=(c, cfg.frames_per_block, h, w),
        device=device,
        seed=cfg.base_seed,
        simulate_step_s=cfg.simulate_step_ms / 1000.0,
    )

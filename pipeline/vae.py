"""diffusers' ``AutoencoderKLWan`` as a streaming decoder (and the image encoder for the attention sink).

The Wan VAE decoder is causal in time: it decodes one latent frame at a time and carries a per-conv feature
cache. ``AutoencoderKLWan.decode`` clears that cache and loops over all frames; :class:`StreamingDecoder` runs the
same loop but keeps the cache from one block to the next, so decoding block by block yields exactly the frames a
one-shot decode of all latents would (tested). Latent frame 0 becomes 1 video frame, every later one 4.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from diffusers import AutoencoderKLWan
from einops import rearrange

from .checkpoints import checkpoint_root, realign

TINY_VAE_CONFIG = dict(
    base_dim=4,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    latents_mean=[0.0] * 4,
    latents_std=[1.0] * 4,
)


def build_vae(path: str | None, seed: int, device="cpu", dtype=torch.float32) -> AutoencoderKLWan:
    """A local diffusers-format checkpoint (``path``; a ``vae/`` subfolder is accepted) or the tiny config with
    weights drawn from ``seed``."""
    if path:
        root = checkpoint_root(path, "vae")
        vae = realign(AutoencoderKLWan.from_pretrained(root, local_files_only=True))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            vae = AutoencoderKLWan(**TINY_VAE_CONFIG)
    if dtype != torch.float32:
        vae = vae.to(dtype)
    return vae.to(device).eval().requires_grad_(False)


def spatial_ratio_of(path: str | None) -> int:
    """Pixels per latent cell, from a checkpoint's config.json without loading weights (tiny default: 8)."""
    if not path:
        return 8
    import json

    with open(os.path.join(checkpoint_root(path, "vae"), "config.json")) as f:
        cfg = json.load(f)
    return 8 * (cfg.get("patch_size") or 1)


def _latent_stats(vae: AutoencoderKLWan, like: torch.Tensor):
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(-1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(-1, 1, 1, 1)
    return mean, std


@torch.no_grad()
def encode_image(vae: AutoencoderKLWan, image: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` in [-1, 1] -> normalised latent frame ``[C, 1, h, w]`` (posterior mode)."""
    x = image.to(device=vae.device, dtype=vae.dtype)[None, :, None]
    z = vae.encode(x).latent_dist.mode()[0]
    mean, std = _latent_stats(vae, z)
    return (z - mean) / std


def load_image(path: str, height: int, width: int) -> torch.Tensor:
    """Read an image file and resize it to ``height x width``: ``[3, H, W]`` float32 in [-1, 1]."""
    import imageio.v3 as iio

    arr = np.asarray(iio.imread(path))
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    img = torch.from_numpy(arr[..., :3].copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return torch.nn.functional.interpolate(img[None], size=(height, width), mode="bilinear", antialias=True)[0]


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """``[3, T, H, W]`` in [-1, 1] -> ``[T, H, W, 3]`` uint8."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return rearrange(x, "c t h w -> t h w c").cpu().numpy()


class StreamingDecoder:
    """Decode latent blocks ``[C, F, h, w]`` in order; returns each block's video ``[3, T, H, W]`` in [-1, 1]."""

    def __init__(self, vae: AutoencoderKLWan):
        self.vae = vae
        self.frames_decoded = 0  # latent frames so far
        vae.clear_cache()

    @staticmethod
    def video_frames(latent_frames: int) -> int:
        """Video frames produced by ``latent_frames`` latent frames."""
        return 0 if latent_frames <= 0 else 1 + 4 * (latent_frames - 1)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        z = latents.to(device=vae.device, dtype=vae.dtype)[None]
        mean, std = _latent_stats(vae, z[0])
        z = z * std[None] + mean[None]
        outs = []
        for f in range(z.shape[2]):
            x = vae.post_quant_conv(z[:, :, f : f + 1])
            vae._conv_idx = [0]
            first = self.frames_decoded == 0
            outs.append(vae.decoder(x, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=first))
            self.frames_decoded += 1
        out = torch.cat(outs, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0)[0]

    def close(self) -> None:
        self.vae.clear_cache()

"""Where finished blocks go, in order: ``--save_latents``, the streaming VAE decode, the mp4 and the progress bar.

Used by the VAE rank and by ``--reference`` alike. Memory stays flat unless ``--save_latents`` asks to keep
every block (that file is the whole stream by definition). ``finish(partial=True)`` is the interrupt path: it
finalises whatever exists and marks it partial.
"""

from __future__ import annotations

import os
import time
from collections import deque

import torch

from .config import GenerationConfig
from .vae import StreamingDecoder, build_vae, to_uint8_frames
from .video import Mp4Writer


def atomic_torch_save(obj, path: str) -> None:
    tmp = path + ".part"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class BlockOutput:
    def __init__(self, cfg: GenerationConfig, device, progress: bool = True, keep_latents: bool | None = None,
                 decode: bool = True):
        """``decode=False``: the caller hands in decoded frames with each block (see :func:`add`)."""
        self.cfg = cfg
        self.keep_latents = bool(cfg.save_latents) if keep_latents is None else keep_latents
        self.blocks = 0
        self.video_frames = 0
        self.latents: list[torch.Tensor] = []
        self.block_times: deque[float] = deque(maxlen=10_000)  # recent block arrival times; bounded
        self.decoder = None
        self.writer = None
        if cfg.output:
            if decode:
                self.decoder = StreamingDecoder(build_vae(cfg.vae_path, cfg.base_seed, device=device))
            self.writer = Mp4Writer(cfg.output, cfg.height, cfg.width, fps=cfg.fps)
        self.bar = None
        if progress:
            from tqdm import tqdm

            total = None if cfg.endless else cfg.num_blocks
            self.bar = tqdm(total=total, unit="block", desc="blocks", dynamic_ncols=True)
        self._started = time.perf_counter()

    def add(self, block: int, latent: torch.Tensor, frames=None, latency: float | None = None) -> None:
        """Block ``block`` (in order): keep its latent if asked, decode it (unless ``frames`` are given) and
        append its frames to the mp4. ``latency``: the latest block latency, for the progress bar."""
        if block != self.blocks:
            raise RuntimeError(f"block {block} arrived out of order (expected {self.blocks})")
        if self.keep_latents:
            self.latents.append(latent.detach().to("cpu", torch.float32))
        if self.writer is not None:
            if frames is None:
                frames = to_uint8_frames(self.decoder.decode(latent))
            self.writer.append(frames)
            self.video_frames += len(frames)
        self.blocks += 1
        self.block_times.append(time.perf_counter())
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self._started, 1e-9)
            shown = [f"{self.video_frames / elapsed:.1f} frames/s" if self.writer else "latents only"]
            if latency is not None:
                shown.append(f"latency {latency * 1000:.0f} ms")
            self.bar.set_postfix_str(", ".join(shown))
            self.bar.update(1)

    def all_latents(self) -> torch.Tensor | None:
        """``[C, frames, h, w]`` float32 of every block so far (kept only with ``keep_latents``)."""
        return torch.cat(self.latents, dim=1) if self.latents else None

    def finish(self, partial: bool = False) -> dict:
        """Finalise the outputs; returns what was written."""
        written = {}
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            path = self.writer.close()
            if path:
                written["output"] = path
            if self.decoder is not None:
                self.decoder.close()
        if self.cfg.save_latents and self.latents:
            payload = self.all_latents()
            if partial:
                payload = {"latents": payload, "partial": True, "blocks": self.blocks}
            atomic_torch_save(payload, self.cfg.save_latents)
            written["save_latents"] = self.cfg.save_latents
        return written

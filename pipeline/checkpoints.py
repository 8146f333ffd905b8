"""Local diffusers-format checkpoints: where a component's files are, and loading them exactly."""

from __future__ import annotations

import os

import torch.nn as nn


def checkpoint_root(path: str, sub: str) -> str:
    """``path/sub`` if it holds a ``config.json`` (a full pipeline directory), else ``path`` itself."""
    nested = os.path.join(path, sub)
    return nested if os.path.isfile(os.path.join(nested, "config.json")) else path


def realign(module: nn.Module) -> nn.Module:
    """Copy every parameter and buffer into freshly allocated (aligned) memory. Weights memory-mapped from
    safetensors can start at any byte offset, and CPU matmul kernels round differently on unaligned data:
    without this, a checkpoint of the seeded tiny weights would not reproduce the seeded model bit for bit."""
    for p in module.parameters():
        p.data = p.data.clone()
    for b in module.buffers():
        b.data = b.data.clone()
    return module

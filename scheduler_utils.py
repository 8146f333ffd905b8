"""Denoising-step table for pipelined samplers: step ``i`` of any block, on any rank, from an explicit index.

A diffusers scheduler is stateful (``_step_index`` advances on every ``step()``), which is what broke the
upstream multi-GPU loop: each rank ran one step and the index it carried was the rank, not the step. This module
builds diffusers' ``FlowMatchEulerDiscreteScheduler`` table once and then performs step ``i`` as a pure function
of ``(i, sample, velocity)``, bit-identical to the scheduler's own sequential ``step()`` (tested).

Standalone: imports only torch and diffusers; no torch.distributed, no model.

Example::

    table = StepTable.from_scheduler(num_steps=8, shift=5.0)
    for i in range(table.num_steps):               # any rank may run any i, in any block
        v = model(x, table.timestep(i))            # x: latent, any shape
        x = table.step(i, x, v)                    # same shape as x
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler


def make_scheduler(shift: float = 5.0, num_train_timesteps: int = 1000) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching Euler scheduler used by Wan-family models (``shift`` is the upstream ``--sample_shift``)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)


@dataclass(frozen=True)
class StepTable:
    """Timesteps and sigmas of one sampling run.

    Attributes:
        timesteps: ``[S]`` float32, the model's timestep input at step ``i``.
        sigmas: ``[S + 1]`` float32, noise level before step ``i`` (``sigmas[S]`` is the terminal level, 0).
    """

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @classmethod
    def from_scheduler(
        cls, num_steps: int, shift: float = 5.0, scheduler: FlowMatchEulerDiscreteScheduler | None = None
    ) -> "StepTable":
        """Build the table from diffusers (``scheduler`` defaults to :func:`make_scheduler` with ``shift``)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        scheduler = scheduler if scheduler is not None else make_scheduler(shift)
        scheduler.set_timesteps(num_steps, device="cpu")
        return cls(timesteps=scheduler.timesteps.clone(), sigmas=scheduler.sigmas.clone())

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.numel())

    def timestep(self, i: int) -> torch.Tensor:
        """The model's timestep for step ``i`` as a ``[1]`` tensor."""
        self._check(i)
        return self.timesteps[i : i + 1]

    def step(self, i: int, sample: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        """Euler step ``i``: ``sample + (sigma[i+1] - sigma[i]) * velocity``, computed as diffusers computes it
        (in float32, result cast to ``velocity``'s dtype). Shapes of ``sample`` and ``velocity`` must match."""
        self._check(i)
        sigmas = self.sigmas.to(sample.device)
        dt = sigmas[i + 1] - sigmas[i]
        return (sample.to(torch.float32) + dt * velocity).to(velocity.dtype)

    def _check(self, i: int) -> None:
        if not 0 <= i < self.num_steps:
            raise IndexError(f"step {i} out of range for a {self.num_steps}-step table")

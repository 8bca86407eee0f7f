"""Where stage 2's corrupt examples come from: one small object per method, so the stage-2 step has one path.

* :class:`DamageAndRepair` (the paper, Sec. 4.1-4.2): drop cells of the encoder feature ``phi = E(x)`` with rate
  theta (mask Omega, 1 = kept), repair, decode: ``x_hat = R(damage(phi, Omega), Omega)``. Without a repair network
  (ablation (k)) ``x_hat`` is the damaged feature decoded, and nothing is trained against C.
* :class:`GanFromNoise` (Table 1 ablation (l)): a DCGAN draws ``x_hat`` from noise; there is no mask.

Each is called as ``source(x, phi, step) -> (x_hat, mask)`` with its own seeded draws, and says which network (if
any) is trained against C: ``module`` (the forward Accelerate prepares), ``root`` and ``trainable_parameters``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .batches import TAG_MASK, TAG_NOISE, torch_generator


class RepairForward(nn.Module):
    """The repair forward Accelerate wraps (DDP must see it): x_hat = R(damage(phi, mask), mask), phi = E(x)."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, phi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.generator.repair_decode(self.generator.damage(phi, mask), mask)


class DamageAndRepair:
    """Damage & repair with the (stage-1) generator; R is trained unless ``repair: none``."""

    has_masks = True

    def __init__(self, generator: nn.Module, theta: float, grid: Tuple[int, int], seed: int, rank: int,
                 device: torch.device, autocast) -> None:
        self.generator, self.theta, self.grid = generator, theta, grid
        self.seed, self.rank, self.device, self.autocast = seed, rank, device, autocast
        self.trainable_parameters: List[torch.Tensor] = list(generator.repair_parameters())
        self.root: Optional[nn.Module] = generator if self.trainable_parameters else None
        self.module: Optional[nn.Module] = RepairForward(generator) if self.trainable_parameters else None

    def set_modes(self) -> None:
        self.generator.set_pretraining_stage(2)

    def __call__(self, x: torch.Tensor, phi: torch.Tensor, step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        gen = self.generator
        mask = gen.sample_mask(x.shape[0], self.grid, self.theta,
                               generator=torch_generator(self.seed, 2, step, self.rank, TAG_MASK)).to(self.device)
        if self.module is not None:
            return self.module(phi, mask), mask
        with torch.no_grad(), self.autocast():
            return gen.repair_decode(gen.damage(phi, mask), mask), mask


class GanFromNoise:
    """Ablation (l): ``x_hat = G(z)``, z ~ N(0, 1); all-zero masks keep the history buffer's layout."""

    has_masks = False

    def __init__(self, gan: nn.Module, grid: Tuple[int, int], seed: int, rank: int, device: torch.device) -> None:
        self.gan, self.grid, self.seed, self.rank, self.device = gan, grid, seed, rank, device
        self.trainable_parameters: List[torch.Tensor] = list(gan.parameters())
        self.root: Optional[nn.Module] = gan
        self.module: Optional[nn.Module] = gan

    def set_modes(self) -> None:
        self.gan.train()

    def __call__(self, x: torch.Tensor, phi: Optional[torch.Tensor], step: int) -> Tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        z = self.gan.sample_noise(b, generator=torch_generator(self.seed, 2, step, self.rank, TAG_NOISE))
        return self.module(z.to(self.device)), torch.zeros((b, 1) + self.grid, device=self.device)

"""The two pretraining stages of "Learning to Spot Artifacts" (paper Sec. 4; docs/method.md), one step each.

Stage 1 (autoencoder, Sec. 4.2): E and D minimise ``L_auto = 30 * MSE(D(E(x)), x)`` (+ weight decay), Eq. (3).

Stage 2 (damage & repair vs. discriminator), E and D frozen:

* real examples ``D(E(x))`` (``real_source: input`` = ablation (a): x itself);
* corrupt examples ``x_hat = R(damage(E(x), Omega), Omega)`` (Sec. 4.1, Eqs. (1)-(2): the repair layers are in the
  generator, timm_spot/models/damage_repair_generator.py), a fresh drop mask Omega per image and step (corrupt.py);
  half of the corrupt batch shown to C comes from the history buffer (with its masks);
* C step: ``L_C`` (losses.discriminator_objective): C's side of L_class, Eq. (4), plus L_mask, Eq. (5);
* R step, on the same batch: ``L_R`` (losses.repair_objective): R's side of Eq. (4) + 30 * L2 on kept cells, and
  the optional cooperative and cell-statistics terms (config ``objective`` presets). C runs in train mode on
  ``[real; x_hat]`` (as the code's single forward) but its BatchNorm running statistics are kept, so they are
  updated once per iteration, by the C step;
* ``update: sequential``: C steps, then R's gradient is taken against the updated C; ``joint`` (the authors' code):
  both gradients are taken at the same C and applied together.

Each stage object builds its networks' updates once (``__init__``, from a :class:`~train_scripts.context.StepContext`:
what a step needs, nothing of the trainer) and then runs :meth:`step` per batch. Stage 2 creates the discriminator
(and ablation (l)'s GAN) and hands them back as ``stage.disc`` and ``stage.gan``; the trainer (trainer.py) owns
everything around the steps: data, seeding, logging, checkpoints, figures.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .batches import TAG_HISTORY, torch_generator
from .context import StepContext
from .corrupt import DamageAndRepair, GanFromNoise
from .losses import (discriminator_accuracies, discriminator_objective, kept_cells_l2_loss, mask_accuracies,
                     reconstruction_loss, repair_objective, upsample_mask)
from .modes import preserved_batchnorm_stats, without_grad_for
from .optim import learning_rate

phase = torch.profiler.record_function  # labels for benchmark.py --profile (no cost otherwise)


class AutoencoderForward(nn.Module):
    """Stage 1 forward Accelerate wraps (DDP must see it): D(E(x))."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator.autoencode(x)


class PretextForward(nn.Module):
    """Discriminator forward on images in [-1, 1]: (real logit [B], mask logits [B, 1, M, N] or None)."""

    def __init__(self, discriminator: nn.Module) -> None:
        super().__init__()
        self.discriminator = discriminator

    def forward(self, x: torch.Tensor):
        return self.discriminator.forward_pretext(x)


def halves(t: Optional[torch.Tensor], b: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(t[:b], t[b:])`` of C's output on ``[real; corrupt]`` (``(None, None)`` without a mask head)."""
    return (None, None) if t is None else (t[:b], t[b:])


class Stage1:
    """Stage 1: the autoencoder (E, D, to_rgb) learns to reconstruct, L_auto of Eq. (3)."""

    def __init__(self, t: StepContext) -> None:
        cfg, acc, gen = t.cfg, t.accelerator, t.generator
        self.t, self.gen, self.total, self.weight = t, gen, t.totals[1], cfg.loss.ae_loss_weight
        gen.set_pretraining_stage(1)
        self.ae = t.network_update(gen, list(gen.autoencoder_parameters()), stage_number=1, prefix='ae')
        self.model, self.ae.optimizer = acc.prepare(AutoencoderForward(gen), self.ae.optimizer)
        self.frozen: Dict[str, nn.Module] = {}  # modules the checkpoint saves beside Accelerate's prepared ones
        self.hashed = {'generator': gen}

    def set_modes(self) -> None:
        self.gen.set_pretraining_stage(1)

    def step(self, step: int, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        lr = learning_rate(step, self.total, self.t.cfg.optim, self.t.global_batch)
        rec = reconstruction_loss(self.model(x), x, self.weight)  # L_auto, Eq. (3)
        out = self.ae(step, lr, rec, {'ae_rec': rec})
        out.update({'ae_mse': out['ae_rec'] / self.weight, 'lr': torch.tensor(lr)})
        return out


class Stage2:
    """Stage 2: C learns to spot the artifacts of damage & repair; R learns to hide them."""

    def __init__(self, t: StepContext) -> None:
        cfg, acc, gen = t.cfg, t.accelerator, t.generator
        self.t, self.total, self.gen, self.w = t, t.totals[2], gen, cfg.loss
        self.real_is_input = cfg.method.real_source == 'input'
        self.r_lr_factor = cfg.optim.r_lr_factor
        self.gan: Optional[nn.Module] = None  # ablation (l)'s DCGAN, created here
        if cfg.method.generator == 'gan':
            self.gan = t.networks.create_gan()
            self.source = GanFromNoise(self.gan, t.grid, t.seed, t.rank, t.device)
        else:
            self.source = DamageAndRepair(gen, cfg.method.theta, t.grid, t.seed, t.rank, t.device, t.autocast)
        self.disc = t.networks.create_discriminator()  # C, created here
        self.set_modes()
        self.c_update = t.network_update(self.disc, list(self.disc.parameters()), stage_number=2, prefix='c')
        self.c_model, self.c_update.optimizer = acc.prepare(PretextForward(self.disc), self.c_update.optimizer)
        self.r_update = None
        if self.source.trainable_parameters:
            self.r_update = t.network_update(self.source.root, self.source.trainable_parameters, stage_number=2,
                                             prefix='r')
            self.source.module, self.r_update.optimizer = acc.prepare(self.source.module, self.r_update.optimizer)
        # the generator's E and D (and R without a repair network) are not prepared: the checkpoint saves them
        trains_generator = self.r_update is not None and isinstance(self.source, DamageAndRepair)
        self.frozen = {'generator': gen} if gen is not None and not trains_generator else {}
        self.hashed = {'discriminator': self.disc}
        if self.r_update is not None:
            self.hashed['gan' if isinstance(self.source, GanFromNoise) else 'generator'] = self.source.root
        self.set_modes()

    def set_modes(self) -> None:
        if self.gen is not None:
            self.gen.set_pretraining_stage(2)
        self.source.set_modes()
        self.disc.train()

    def step(self, step: int, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        t, b, w = self.t, x.shape[0], self.w
        lr = learning_rate(step, self.total, t.cfg.optim, t.global_batch)
        with phase('stage2: real and corrupt examples'):
            with torch.no_grad(), t.autocast():  # E is frozen: phi = E(x) once, no graph, for both paths
                phi = None if self.gen is None else self.gen.encode(x)
                x_real = x if self.real_is_input else self.gen.decode(phi)  # real: D(E(x))
            x_hat, mask = self.source(x, phi, step)  # corrupt: R(damage(E(x), Omega), Omega)
            x_real, x_hat = x_real.float(), x_hat.float()
            corrupt, corrupt_masks, from_history = t.history.mix(
                x_hat.detach(), mask, torch_generator(t.seed, 2, step, t.rank, TAG_HISTORY))

        joint = t.cfg.method.update == 'joint'
        with phase('stage2: C step'):  # L_C = Eq. (4) for C + Eq. (5): real vs corrupt, and where the artifacts are
            logits, mask_logits = self.c_model(t.memory_format(torch.cat([x_real, corrupt])))
            l_c, parts = discriminator_objective(*halves(logits, b), *halves(mask_logits, b), corrupt_masks,
                                                 w.class_loss_weight, w.mask_loss_weight)
            out = self.c_update.gradients(step, lr, l_c, parts)
            if not joint:  # sequential: R plays against the updated C
                self.c_update.apply()

        with phase('stage2: R step'):  # L_R = Eq. (4) for R + L2 on kept cells, against C (joint: C before its step)
            if self.r_update is not None:
                out.update(self.r_update.gradients(step, lr * self.r_lr_factor,
                                                   *self.repair_loss(x_real, x_hat, x, mask, b)))
                if joint:  # the authors' code: both gradients at the same C, applied together
                    self.c_update.apply()
                self.r_update.apply()
            elif joint:
                self.c_update.apply()

        out.update(self.monitors(logits, mask_logits, corrupt_masks, x_real, x_hat, x, mask))
        out.update({'lr': torch.tensor(lr), 'history_fraction': from_history.float().mean()})
        return out

    def repair_loss(self, x_real, x_hat, x, mask, b):
        """L_R from C's outputs on [real; x_hat] (C's parameters get no gradient, its BN running statistics are
        kept); with ``r_real_half_grad: false`` the real half's outputs are detached, so R's gradient comes from
        the corrupt half alone and not through C's batch statistics."""
        t, w = self.t, self.w
        with without_grad_for(self.disc), preserved_batchnorm_stats(self.disc), t.autocast():
            r_logits, r_mask_logits = self.disc.forward_pretext(t.memory_format(torch.cat([x_real, x_hat])))
        (real, corrupt), (real_mask, corrupt_mask) = halves(r_logits, b), halves(r_mask_logits, b)
        if not t.cfg.method.r_real_half_grad:
            real = real.detach()
            real_mask = None if real_mask is None else real_mask.detach()
        coop_class, coop_mask = w.r_coop_weights()
        return repair_objective(real, corrupt, real_mask, corrupt_mask, x_hat, x,
                                mask if self.source.has_masks else None, w.generator_loss, w.adv_loss_weight,
                                w.rec_loss_weight, coop_class, coop_mask, w.r_cell_stats_weight, x_real)

    @torch.no_grad()
    def monitors(self, logits, mask_logits, corrupt_masks, x_real, x_hat, x, mask) -> Dict[str, torch.Tensor]:
        """How the game goes (logged, not trained on): C's accuracies and mean logits, the mask head's accuracy
        and AUC, how far corrupt images are from the real ones on dropped pixels."""
        b = x.shape[0]
        real, corrupt = halves(logits.detach().float(), b)
        out = dict(discriminator_accuracies(real, corrupt), logit_real=real.mean(), logit_corrupt=corrupt.mean())
        if not self.source.has_masks:
            return out
        if mask_logits is not None:
            out.update(mask_accuracies(*halves(mask_logits.detach(), b), corrupt_masks))
        dropped = 1.0 - upsample_mask(mask, x.shape[-2:])
        out['corrupt_l1_dropped'] = ((x_hat - x_real).abs() * dropped).sum() / \
            (dropped.sum() * x.shape[1]).clamp_min(1.0)
        if self.r_update is None:  # no repair network (ablation k): the kept-cell L2 as a monitor only
            out['r_rec'] = kept_cells_l2_loss(x_hat, x, mask)
        return out

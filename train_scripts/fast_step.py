"""The stage steps at the device's pace: the same updates as :class:`~train_scripts.stages.Stage1` /
:class:`~train_scripts.stages.Stage2`, without a host synchronisation inside the step.

What differs from the reference step (stages.py), and what does not:

* the same networks, optimizers (:class:`~train_scripts.optim.NetworkUpdate`: Adam, fused where torch has it, the
  weight decay, bias-gradient scaling), the same losses (losses.py) and the same order of the two updates
  (``update: sequential`` or ``joint``): in float32, on the same batch, masks and history picks, the parameters are
  those of the reference step (tests/test_fast_step.py);
* the drop masks and the history picks are drawn on the device (device generators seeded by ``(seed, stage, step,
  rank)``), not on the host and copied: other random streams than the reference, the same distributions;
* the NaN/inf check and the metrics are accumulated on the device (:class:`DeviceMeters`) and read every
  ``read_every`` steps (one synchronisation then); a non-finite loss stops the run at that read, naming the loss and
  the steps it covers (the reference stops at the step itself);
* C's monitors (accuracies, mask AUC, L1 on dropped pixels; logged, not trained on) are computed on read steps only;
* R's pass through C uses detached copies of C's parameters (``torch.func.functional_call``) instead of switching
  C's ``requires_grad`` off and on every step (a DDP trap: parameters whose ``requires_grad`` changes while wrapped),
  and each backward reaches its own network's parameters alone (``backward(inputs=...)``);
* fp16 is refused (one GradScaler stepping two optimizers would update its scale twice per iteration): use bf16;
* ``compile=True`` compiles the forwards (E/D, R, C with its losses) with ``fullgraph=True`` and static shapes: a
  graph that does not compile is a :class:`CompileError` naming the part, never a silent eager fallback.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from .batches import TAG_HISTORY, TAG_MASK
from .context import StepContext
from .corrupt import DamageAndRepair
from .device_data import device_generator
from .losses import discriminator_objective, reconstruction_loss, repair_objective
from .modes import preserved_batchnorm_stats
from .optim import NonFiniteLossError, learning_rate
from .stages import PretextForward, Stage1, Stage2, halves, phase


class CompileError(RuntimeError):
    """torch.compile could not compile a part of the step (the message names it and the reason)."""


class Compiled:
    """``torch.compile(fn, fullgraph=True, dynamic=False)`` whose failure (at its first call, when dynamo traces)
    is a :class:`CompileError` naming ``name``."""

    def __init__(self, fn: Callable, name: str, backend: str = 'inductor') -> None:
        self.name, self.fn = name, torch.compile(fn, fullgraph=True, dynamic=False, backend=backend)

    def __call__(self, *args, **kwargs):
        try:
            return self.fn(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as e:  # graph breaks (Unsupported), backend failures, ...
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CompileError(f'torch.compile of {self.name} failed ({type(e).__name__}: {reason}); the step does '
                               f'not fall back to eager: run without compile, or fix the graph') from e


class DeviceMeters:
    """Sums of the step's scalars on the device, and how often each was non-finite; :meth:`read` (one sync) returns
    the means since the last read and raises :class:`NonFiniteLossError` if a loss was NaN/inf."""

    def __init__(self, stage_number: int) -> None:
        self.stage_number = stage_number
        self.keys: Optional[List[str]] = None
        self.sums = self.bad = None
        self.count, self.first_step = 0, None

    def add(self, step: int, values: Dict[str, torch.Tensor]) -> None:
        if self.keys is None:
            self.keys = list(values)
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in self.keys])
        finite = torch.isfinite(stacked)
        if self.sums is None:
            self.sums, self.bad = torch.zeros_like(stacked), torch.zeros_like(stacked)
        self.sums.add_(torch.where(finite, stacked, torch.zeros_like(stacked)))
        self.bad.add_((~finite).float())
        self.first_step = step if self.first_step is None else self.first_step
        self.count += 1

    def read(self, step: int) -> Dict[str, float]:
        """Means over the steps since the last read (one host synchronisation)."""
        if self.sums is None or self.count == 0:
            return {}
        sums, bad = torch.stack([self.sums, self.bad]).tolist()
        first, count = self.first_step, self.count
        self.sums.zero_()
        self.bad.zero_()
        self.count, self.first_step = 0, None
        for k, b in zip(self.keys, bad):
            if b:
                raise NonFiniteLossError(
                    f'non-finite loss {k!r} in {int(b)} of stage {self.stage_number} steps {first}..{step} (read '
                    f'every few steps on the device); stopping the run. Lower the learning rate or check the data.')
        return {k: s / count for k, s in zip(self.keys, sums)}


class _Deferred:
    """Stands in for :class:`~train_scripts.optim.FiniteLossCheck` in a NetworkUpdate: no check in the step (the
    meters carry it to the next read)."""

    def __call__(self, step: int, losses: Dict[str, torch.Tensor]) -> None:
        return None


def _backward_to(params: List[torch.Tensor]) -> Callable[[torch.Tensor], None]:
    """The loss's backward into ``params`` alone (no gradient computed for other leaves it reaches)."""
    return lambda loss: loss.backward(inputs=params)


def refuse_fp16(t: StepContext) -> None:
    mp = getattr(t.accelerator, 'mixed_precision', 'no')
    if str(mp) == 'fp16':
        raise ValueError('the fast step does not run fp16: one GradScaler stepping two optimizers would update its '
                         'loss scale twice per iteration; use mixed_precision bf16 (or no)')


class FastStage1(Stage1):
    """Stage 1 (Eq. (3)) without a host sync per step; ``step`` returns nothing, :meth:`read` the means."""

    def __init__(self, t: StepContext, read_every: int = 50, compile: bool = False,
                 compile_backend: str = 'inductor') -> None:
        refuse_fp16(t)
        super().__init__(t)
        self.read_every, self.meters = read_every, DeviceMeters(1)
        self.ae.check_finite = _Deferred()
        self.ae.backward = _backward_to(list(self.gen.autoencoder_parameters()))
        self.forward = self.model
        if compile:
            self.forward = Compiled(self.model, 'the stage-1 autoencoder forward', compile_backend)

    def step(self, step: int, x: torch.Tensor) -> Optional[Dict[str, float]]:
        lr = learning_rate(step, self.total, self.t.cfg.optim, self.t.global_batch)
        rec = reconstruction_loss(self.forward(x), x, self.weight)
        self.meters.add(step, self.ae(step, lr, rec, {'ae_rec': rec}))
        if (step + 1) % self.read_every == 0:
            return self.read(step)
        return None

    def read(self, step: int) -> Dict[str, float]:
        out = self.meters.read(step)
        if out:
            out['ae_mse'] = out['ae_rec'] / self.weight
        out['lr'] = learning_rate(step, self.total, self.t.cfg.optim, self.t.global_batch)
        return out


class FastStage2(Stage2):
    """Stage 2, one iteration per :meth:`step` without a host sync (module docstring); the damage & repair method
    with a repair network (ablations (k) and (l) run on the reference step)."""

    def __init__(self, t: StepContext, read_every: int = 50, compile: bool = False,
                 compile_backend: str = 'inductor') -> None:
        refuse_fp16(t)
        if t.cfg.method.generator != 'damage_repair' or t.cfg.method.repair == 'none':
            raise ValueError('the fast step runs damage & repair with a repair network; ablations (k) and (l) run on '
                             'the reference step (stages.py)')
        super().__init__(t)
        assert isinstance(self.source, DamageAndRepair) and self.r_update is not None
        self.read_every, self.meters = read_every, DeviceMeters(2)
        self.r_params = list(self.source.trainable_parameters)
        self.c_update.check_finite = self.r_update.check_finite = _Deferred()
        self.c_update.backward = _backward_to(list(self.disc.parameters()))
        self.r_update.backward = _backward_to(self.r_params)
        self.c_pretext = PretextForward(self.disc)  # not prepared: R's pass through C (repair_loss)
        self.real_and_phi, self.repair, self.c_forward = self._real_and_phi, self.source.module, self._c_forward
        if compile:
            self.real_and_phi = Compiled(self._real_and_phi, 'the frozen E and D (real examples)', compile_backend)
            self.repair = Compiled(self.source.module, 'the repair forward R', compile_backend)
            self.c_forward = Compiled(self._c_forward, "C's forward and L_C", compile_backend)
        self._last = None

    def _real_and_phi(self, x):
        with torch.no_grad(), self.t.autocast():
            phi = self.gen.encode(x)
            return phi, (x if self.real_is_input else self.gen.decode(phi))

    def _c_forward(self, x_real, corrupt, corrupt_masks):
        w, b = self.w, x_real.shape[0]
        logits, mask_logits = self.c_model(self.t.memory_format(torch.cat([x_real, corrupt])))
        l_c, parts = discriminator_objective(*halves(logits, b), *halves(mask_logits, b), corrupt_masks,
                                             w.class_loss_weight, w.mask_loss_weight)
        return logits, mask_logits, l_c, parts

    def draw_mask(self, step: int, b: int) -> torch.Tensor:
        """Omega on the device: 1 = kept, each cell dropped with probability theta."""
        g = device_generator(self.t.device, self.t.seed, 2, step, self.t.rank, TAG_MASK)
        m, n = self.t.grid
        return (torch.rand((b, 1, m, n), generator=g, device=self.t.device) >= self.source.theta).float()

    def step(self, step: int, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
             history_generator: Optional[torch.Generator] = None) -> Optional[Dict[str, float]]:
        """One iteration; ``mask`` / ``history_generator`` given: those draws instead of the device's (tests)."""
        t, b = self.t, x.shape[0]
        lr = learning_rate(step, self.total, t.cfg.optim, t.global_batch)
        joint = t.cfg.method.update == 'joint'
        with phase('stage2: real and corrupt examples'):
            phi, x_real = self.real_and_phi(x)
            mask = self.draw_mask(step, b) if mask is None else mask
            x_hat = self.repair(phi, mask)
            x_real, x_hat = x_real.float(), x_hat.float()
            g = history_generator or device_generator(t.device, t.seed, 2, step, t.rank, TAG_HISTORY)
            corrupt, corrupt_masks, from_history = t.history.mix(x_hat.detach(), mask, g)
        with phase('stage2: C step'):
            logits, mask_logits, l_c, parts = self.c_forward(x_real, corrupt, corrupt_masks)
            out = self.c_update.gradients(step, lr, l_c, parts)
            if not joint:
                self.c_update.apply()
        with phase('stage2: R step'):
            out.update(self.r_update.gradients(step, lr * self.r_lr_factor, *self.repair_loss(x_real, x_hat, x,
                                                                                              mask, b)))
            if joint:
                self.c_update.apply()
            self.r_update.apply()
        out['history_fraction'] = from_history.float().mean()
        self.meters.add(step, out)
        if (step + 1) % self.read_every == 0:
            out = self.read(step)
            out.update({k: float(v) for k, v in self.monitors(logits, mask_logits, corrupt_masks, x_real, x_hat, x,
                                                              mask).items()})
            return out
        return None

    def read(self, step: int) -> Dict[str, float]:
        out = self.meters.read(step)
        out['lr'] = learning_rate(step, self.total, self.t.cfg.optim, self.t.global_batch)
        return out

    def repair_loss(self, x_real, x_hat, x, mask, b):
        """L_R as the reference (stages.Stage2.repair_loss), C run with detached copies of its parameters
        (``functional_call``) instead of switching their ``requires_grad`` off and on: no gradient, no activation
        kept for one, and nothing changes under DDP."""
        t, w = self.t, self.w
        frozen = {f'discriminator.{n}': p.detach() for n, p in self.disc.named_parameters()}
        with preserved_batchnorm_stats(self.disc), t.autocast():
            r_logits, r_mask_logits = torch.func.functional_call(self.c_pretext, frozen,
                                                                 (t.memory_format(torch.cat([x_real, x_hat])),))
        (real, corrupt), (real_mask, corrupt_mask) = halves(r_logits, b), halves(r_mask_logits, b)
        if not t.cfg.method.r_real_half_grad:
            real = real.detach()
            real_mask = None if real_mask is None else real_mask.detach()
        coop_class, coop_mask = w.r_coop_weights()
        return repair_objective(real, corrupt, real_mask, corrupt_mask, x_hat, x, mask, w.generator_loss,
                                w.adv_loss_weight, w.rec_loss_weight, coop_class, coop_mask, w.r_cell_stats_weight,
                                x_real)

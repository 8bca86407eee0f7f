"""Optimisation of one network: Adam with the recipe's settings, the L2 weight decay and the parameters it covers,
bias-gradient scaling, the learning-rate schedule, and the stop on a non-finite loss.

A :class:`NetworkUpdate` is one network's optimiser step as the stages use it: ``update(step, lr, objective,
parts)`` sets the LR, adds the weight decay, stops on a non-finite loss, backpropagates (through Accelerate), scales
bias gradients and steps Adam; ``gradients`` and ``apply`` are its two halves (stage 2's joint update computes both
networks' gradients before applying either).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from .config import OptimConfig
from .losses import weight_decay_loss

Backward = Callable[[torch.Tensor], None]  # ``accelerator.backward``: the loss's backward through Accelerate


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names it and the step."""


class FiniteLossCheck:
    """Stops the run on a NaN or infinite loss (on any process), naming the loss, the step and the checkpoint kept.

    ``kept_checkpoint`` answers which checkpoint a stop leaves as the last good one (None: none written yet).
    """

    def __init__(self, accelerator, stage_number: int, kept_checkpoint: Callable[[], Optional[str]]) -> None:
        self.accelerator, self.stage_number, self.kept_checkpoint = accelerator, stage_number, kept_checkpoint

    def __call__(self, step: int, losses: Dict[str, torch.Tensor]) -> None:
        acc = self.accelerator
        # one host sync for all losses (this runs every step)
        finite = torch.stack([torch.isfinite(v.detach()).all() for v in losses.values()]).tolist()
        bad = [k for k, ok in zip(losses, finite) if not ok]
        n_bad = len(bad)
        if acc.num_processes > 1:
            flag = torch.tensor([float(n_bad)], device=acc.device)
            n_bad = int(acc.reduce(flag, 'sum').item())
        if n_bad:
            what = (f"loss {bad[0]!r} = {float(losses[bad[0]].detach().float().mean())}" if bad
                    else 'a loss on another process')
            keep = self.kept_checkpoint()
            keep = f'the last good checkpoint {keep} is kept (resume with --resume)' if keep else \
                'no checkpoint had been written yet'
            raise NonFiniteLossError(
                f'non-finite {what} at stage {self.stage_number} step {step} (process {acc.process_index}); '
                f'stopping the run: {keep}. Lower the learning rate or check the data.')


def batch_lr_factor(optim: OptimConfig, global_batch: Optional[int]) -> float:
    """The factor ``lr_scaling`` applies to lr at ``global_batch`` (batch_size x processes): 1 for 'none' (or an
    unknown batch), sqrt(global / lr_reference_batch) for 'sqrt', global / lr_reference_batch for 'linear'."""
    if optim.lr_scaling == 'none' or not global_batch:
        return 1.0
    ratio = global_batch / optim.lr_reference_batch
    return ratio ** 0.5 if optim.lr_scaling == 'sqrt' else ratio


def learning_rate(step: int, total: int, optim: OptimConfig, global_batch: Optional[int] = None) -> float:
    """LR at (0-based) ``step`` of a ``total``-step stage, at ``global_batch`` (``lr_scaling``: batch_lr_factor).

    ``paper``: linear from lr to lr * lr_end_factor (3e-4 -> 3e-6) over the stage; ``code``: TF polynomial_decay
    (power 1) to lr * lr_end_factor over the first 90 % of the steps, then constant; ``constant``.
    """
    base = optim.lr * batch_lr_factor(optim, global_batch)
    end = base * optim.lr_end_factor
    if optim.lr_schedule == 'constant' or total <= 0:
        return base
    if optim.lr_schedule == 'paper':
        return base + (end - base) * min(step / total, 1.0)
    decay_steps = 0.9 * total
    return (base - end) * (1.0 - min(step, decay_steps) / decay_steps) + end


def decayed_parameters(module: nn.Module, trainable: Optional[Iterable[torch.Tensor]] = None,
                       include_biases: bool = True) -> List[torch.Tensor]:
    """Weights (and biases) of the conv / linear layers of ``module`` (not BatchNorm), optionally restricted to
    ``trainable`` (the optimizer's parameters): what the TF code's l2 regularizers cover."""
    allowed = None if trainable is None else {id(p) for p in trainable}
    out: List[torch.Tensor] = []
    seen = set()
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)):
            names = ('weight', 'bias') if include_biases else ('weight',)
            for name in names:
                p = getattr(m, name, None)
                if isinstance(p, torch.Tensor) and p.requires_grad and id(p) not in seen and \
                        (allowed is None or id(p) in allowed):
                    seen.add(id(p))
                    out.append(p)
    return out


def bias_parameters(module: nn.Module, trainable: Optional[Iterable[torch.Tensor]] = None) -> List[torch.Tensor]:
    """Conv / linear biases of ``module`` (the TF code's variables named ``*/biases``)."""
    allowed = None if trainable is None else {id(p) for p in trainable}
    out = []
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)):
            b = getattr(m, 'bias', None)
            if isinstance(b, torch.Tensor) and (allowed is None or id(b) in allowed):
                out.append(b)
    return out


def scale_gradients(params: Iterable[torch.Tensor], factor: float) -> None:
    """Multiply the gradients of ``params`` in place (the code's ``multiply_gradients`` with 2.0 on biases).

    NOTE Adam divides the step by the running RMS of the gradient, so a constant gradient scale on a parameter
    cancels out except against ``eps``: doubling bias gradients changes Adam's updates only marginally. The
    option exists for fidelity to the code (it matters for SGD).
    """
    if factor == 1.0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


class NetworkUpdate:
    """Adam over ``params`` of ``module`` (the trainable ones), with the weight decay of the recipe.

    The L2 weight decay ``wd * sum(w**2) / 2`` has the gradient ``wd * w``, which is exactly what Adam's (coupled)
    ``weight_decay`` adds to the gradient: it is applied there, without a loss term and its backward, unless bias
    gradients are scaled (``bias_grad_mult``, which must scale the decay's gradient too). Fused Adam where torch has
    it: one pass over all tensors instead of a Python loop of small ops. Its two collaborators: ``backward`` (the
    loss's backward, through Accelerate) and ``check_finite`` (:class:`FiniteLossCheck`).
    """

    def __init__(self, module: nn.Module, params: List[torch.Tensor], optim: OptimConfig, device: torch.device,
                 prefix: str, backward: Backward, check_finite: FiniteLossCheck) -> None:
        self.cfg, self.device, self.prefix = optim, device, prefix
        self.backward, self.check_finite = backward, check_finite
        self.decay = decayed_parameters(module, params, optim.weight_decay_biases)
        self.biases = bias_parameters(module, params)
        self.decay_in_optimizer = optim.bias_grad_mult == 1.0
        kwargs = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.adam_eps)
        if optim.fused_adam and device.type in ('cpu', 'cuda'):
            kwargs['fused'] = True
        groups = [{'params': params, 'weight_decay': 0.0}]
        if self.decay_in_optimizer:
            ids = {id(p) for p in self.decay}
            groups = [{'params': [p for p in params if id(p) in ids], 'weight_decay': optim.weight_decay},
                      {'params': [p for p in params if id(p) not in ids], 'weight_decay': 0.0}]
        self.optimizer = torch.optim.Adam([g for g in groups if g['params']], **kwargs)

    def weight_decay_term(self) -> torch.Tensor:
        """The weight-decay part of the loss: its value only (for the logs) when Adam applies the decay, else the
        differentiable term."""
        wd = self.cfg.weight_decay
        if not self.decay_in_optimizer:
            return weight_decay_loss(self.decay, wd)
        with torch.no_grad():
            if not self.decay or wd == 0:
                return torch.zeros((), device=self.device)
            norms = torch._foreach_norm([p.detach() for p in self.decay])
            return wd * 0.5 * torch.stack(norms).float().pow(2).sum()

    def gradients(self, step: int, lr: float, objective: torch.Tensor,
                  parts: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """objective + weight decay, NaN check, backward, bias-gradient scaling; the LR is set for :meth:`apply`.
        Returns the detached parts with ``<prefix>_wd`` and ``<prefix>_total`` for the logs."""
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        wd = self.weight_decay_term()
        total = objective + wd
        logged = {**parts, f'{self.prefix}_wd': wd, f'{self.prefix}_total': total}
        self.check_finite(step, logged)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(total)
        scale_gradients(self.biases, self.cfg.bias_grad_mult)
        return {k: v.detach() for k, v in logged.items()}

    def apply(self) -> None:
        """The Adam step with the gradients of the last :meth:`gradients`."""
        self.optimizer.step()

    def __call__(self, step: int, lr: float, objective: torch.Tensor,
                 parts: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """:meth:`gradients` then :meth:`apply`: one network's whole update."""
        logged = self.gradients(step, lr, objective, parts)
        self.apply()
        return logged

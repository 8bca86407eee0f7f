"""Optimisation of one network: Adam with the recipe's settings, the L2 weight decay, the learning-rate schedule.

A :class:`NetworkUpdate` is one network's optimiser step as the stages use it: ``update(step, lr, objective,
parts)`` sets the LR, adds the weight decay, stops on a non-finite loss, backpropagates (through Accelerate), scales
bias gradients and steps Adam; ``gradients`` and ``apply`` are its two halves (stage 2's joint update computes both
networks' gradients before applying either).
"""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn as nn

from .config import OptimConfig
from .losses import bias_parameters, decayed_parameters, scale_gradients, weight_decay_loss


def learning_rate(step: int, total: int, optim: OptimConfig) -> float:
    """LR at (0-based) ``step`` of a ``total``-step stage.

    ``paper``: linear from lr to lr * lr_end_factor (3e-4 -> 3e-6) over the stage; ``code``: TF polynomial_decay
    (power 1) to lr * lr_end_factor over the first 90 % of the steps, then constant; ``constant``.
    """
    base = optim.lr
    end = base * optim.lr_end_factor
    if optim.lr_schedule == 'constant' or total <= 0:
        return base
    if optim.lr_schedule == 'paper':
        return base + (end - base) * min(step / total, 1.0)
    decay_steps = 0.9 * total
    return (base - end) * (1.0 - min(step, decay_steps) / decay_steps) + end


class NetworkUpdate:
    """Adam over ``params`` of ``module`` (the trainable ones), with the weight decay of the recipe.

    The L2 weight decay ``wd * sum(w**2) / 2`` has the gradient ``wd * w``, which is exactly what Adam's (coupled)
    ``weight_decay`` adds to the gradient: it is applied there, without a loss term and its backward (14 % of a CPU
    stage-2 step), unless bias gradients are scaled (``bias_grad_mult``, which must scale the decay's gradient too).
    Fused Adam where torch has it: one pass over all tensors instead of a Python loop of small ops (the 16.8 M-weight
    fc6 made Adam ~10 % of a CPU step).
    """

    def __init__(self, module: nn.Module, params: List[torch.Tensor], optim: OptimConfig, device: torch.device,
                 prefix: str, backward: Callable[[torch.Tensor], None],
                 check_finite: Callable[[int, Dict[str, torch.Tensor]], None]) -> None:
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

"""Context managers that change a network's training state for a while and put it back: BatchNorm running
statistics kept through a train-mode forward, parameters without gradients, eval mode."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch.nn as nn


@contextlib.contextmanager
def preserved_batchnorm_stats(module: nn.Module):
    """Run ``module`` in train mode (batch statistics) without changing its BatchNorm running statistics.

    The running buffers are swapped for copies during the forward (the copies absorb the update and are dropped);
    restoring by an in-place copy would bump the version of tensors autograd saved for the backward.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            saved.append((m, m.running_mean, m.running_var, m.num_batches_tracked))
            m.running_mean = m.running_mean.clone()
            m.running_var = m.running_var.clone()
            m.num_batches_tracked = m.num_batches_tracked.clone()
    try:
        yield
    finally:
        for m, mean, var, count in saved:
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count


@contextlib.contextmanager
def without_grad_for(module: nn.Module):
    """``module``'s parameters get no gradient inside (R's backward passes through C without touching it)."""
    module.requires_grad_(False)
    try:
        yield
    finally:
        module.requires_grad_(True)


@contextlib.contextmanager
def eval_modes(*modules: Optional[nn.Module]):
    """``modules`` (None skipped) in eval mode inside; every submodule's own mode restored after."""
    saved = [(m, m.training) for root in modules if root is not None for m in root.modules()]
    try:
        for root in modules:
            if root is not None:
                root.eval()
        yield
    finally:
        for m, mode in saved:
            m.training = mode

"""Layerwise linear probes (paper Tables 4 and 5; Zhang et al. 2016 protocol) on cached frozen features.

One multinomial logistic regression per tap, all trained together: every mini-batch of row indices feeds every
layer's classifier, so one pass over the data per epoch trains all of them. Features are standardised with the
training set's per-dimension mean and standard deviation; Adam (or SGD with momentum) with weight decay and a
cosine learning-rate decay; top-1 on the held-out validation rows after the last epoch (no model selection on the
validation part).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import FeatureSet

__all__ = ['ProbeConfig', 'train_linear_probes', 'select_weight_decay', 'train_probes_per_layer_wd', 'format_table']


@dataclass
class ProbeConfig:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    optimizer: str = 'adam'  # 'adam' (L2 penalty), 'adamw' (decoupled) or 'sgd' (momentum, L2)
    momentum: float = 0.9
    standardize: bool = True
    seed: int = 0


def _standardize(train: List[torch.Tensor], others: Sequence[List[torch.Tensor]], eps: float = 1e-6):
    """Per-dimension z-scoring with the training statistics (float32 copies; inputs left untouched)."""
    out_train, out_others = [], [[] for _ in others]
    for i, x in enumerate(train):
        x = x.float()
        mean = x.mean(0, keepdim=True)
        std = x.std(0, keepdim=True, unbiased=False).clamp_min(eps)
        out_train.append((x - mean) / std)
        for j, o in enumerate(others):
            out_others[j].append((o[i].float() - mean) / std)
    return out_train, out_others


@torch.no_grad()
def _top1(heads: nn.ModuleList, xs: List[torch.Tensor], y: torch.Tensor, batch_size: int = 2048) -> List[float]:
    if y.numel() == 0:
        return [float('nan')] * len(heads)
    correct = [0] * len(heads)
    device = next(heads.parameters()).device
    for s in range(0, y.numel(), batch_size):
        for i, (h, x) in enumerate(zip(heads, xs)):
            pred = h(x[s:s + batch_size].to(device)).argmax(1).cpu()
            correct[i] += int((pred == y[s:s + batch_size]).sum())
    return [100.0 * c / y.numel() for c in correct]


def train_linear_probes(
        train: FeatureSet,
        val: Optional[FeatureSet],
        num_classes: int,
        cfg: ProbeConfig = ProbeConfig(),
        log: Optional[Callable[[str], None]] = None,
        device: Union[str, torch.device] = 'cpu',
) -> Dict[str, dict]:
    """Train one linear classifier per tap of ``train`` together; return per layer top-1 (val and train).

    Returns ``{name: {'top1': val %, 'train_top1': train %, 'dim': D, 'grid': (gh, gw)}, ...}`` in tap order plus
    ``'_meta'`` with the config and the seconds spent.
    """
    t0 = time.time()
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    ytr = train.labels.long()
    if ytr.numel() == 0:
        raise ValueError('no training rows for the linear probe')
    if int(ytr.max()) >= num_classes:
        raise ValueError(f'labels go up to {int(ytr.max())} but num_classes is {num_classes}')
    others = [val.features] if val is not None else []
    for part, fs in (('training', train), ('validation', val)):
        if fs is None:
            continue
        for name, x in zip(fs.names, fs.features):
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f'{part} features of layer {name} hold {int((~torch.isfinite(x)).sum())} non-finite '
                                 f'values (NaN or inf): the model weights (or the images) give NaN; check the weights '
                                 f'file (a diverged run?) and clear the feature cache (--no-cache)')
    if cfg.standardize:
        xtr, others = _standardize(train.features, others)
    else:
        xtr, others = [x.float() for x in train.features], [[x.float() for x in o] for o in others]
    xval = others[0] if val is not None else None

    heads = nn.ModuleList([nn.Linear(x.shape[1], num_classes) for x in xtr]).to(device)
    for h in heads:
        nn.init.zeros_(h.weight)
        nn.init.zeros_(h.bias)
    if cfg.optimizer == 'adam':  # L2 penalty in the gradient: the logistic-regression weight decay
        opt = torch.optim.Adam(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == 'adamw':  # decoupled weight decay
        opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == 'sgd':
        opt = torch.optim.SGD(heads.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f'unknown optimizer {cfg.optimizer!r} (adam, adamw or sgd)')
    n = ytr.numel()
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        running = torch.zeros(len(heads))
        for s in range(0, n, cfg.batch_size):
            idx = perm[s:s + cfg.batch_size]
            yb = ytr[idx].to(device)
            losses = torch.stack([F.cross_entropy(h(x[idx].to(device)), yb) for h, x in zip(heads, xtr)])
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            opt.step()
            sched.step()
            running += losses.detach().cpu() * idx.numel()
        if log is not None and (epoch + 1 == cfg.epochs or (epoch + 1) % max(1, cfg.epochs // 5) == 0):
            log(f'  probe epoch {epoch + 1}/{cfg.epochs} loss ' +
                ' '.join(f'{nm}={v:.3f}' for nm, v in zip(train.names, (running / n).tolist())))
    heads.eval()
    train_acc = _top1(heads, xtr, ytr)
    val_acc = _top1(heads, xval, val.labels.long()) if val is not None else [float('nan')] * len(heads)
    results: Dict[str, dict] = {}
    for i, name in enumerate(train.names):
        results[name] = dict(top1=val_acc[i], train_top1=train_acc[i], dim=int(xtr[i].shape[1]),
                             grid=tuple(train.grids[i]))
    results['_meta'] = dict(config=asdict(cfg), seconds=round(time.time() - t0, 2), n_train=int(n),
                            n_val=int(val.labels.numel()) if val is not None else 0, num_classes=num_classes)
    return results


def select_weight_decay(train: FeatureSet, num_classes: int, candidates: Sequence[float],
                        cfg: ProbeConfig = ProbeConfig(), holdout_fraction: float = 0.2,
                        device: Union[str, torch.device] = 'cpu') -> Dict[str, dict]:
    """Each layer's probe weight decay, chosen on the probe-TRAINING rows only: a seeded ``holdout_fraction`` of
    every class is held back, probes are trained on the rest with each candidate, and the candidate with the best
    top-1 on the held-back rows wins (ties: the larger decay). The evaluation rows are never touched.

    Returns ``{layer: {'weight_decay': best, 'sweep': {wd: top1 %}}}``.
    """
    if not candidates:
        raise ValueError('select_weight_decay: no candidate weight decays')
    g = torch.Generator().manual_seed(cfg.seed)
    labels = train.labels.long()
    fit, held = [], []
    for c in labels.unique().tolist():
        pos = torch.nonzero(labels == c).flatten()
        pos = pos[torch.randperm(pos.numel(), generator=g)]
        k = max(1, int(round(holdout_fraction * pos.numel()))) if pos.numel() > 1 else 0
        held.append(pos[:k])
        fit.append(pos[k:])
    fit_set, held_set = train.select(torch.cat(fit).numpy()), train.select(torch.cat(held).numpy())
    sweep: Dict[str, Dict[float, float]] = {name: {} for name in train.names}
    for wd in candidates:
        res = train_linear_probes(fit_set, held_set, num_classes, replace(cfg, weight_decay=float(wd)), device=device)
        for name in train.names:
            sweep[name][float(wd)] = res[name]['top1']
    return {name: {'weight_decay': max(acc, key=lambda w: (acc[w], w)), 'sweep': acc} for name, acc in sweep.items()}


def train_probes_per_layer_wd(train: FeatureSet, val: Optional[FeatureSet], num_classes: int,
                              weight_decays: Dict[str, float], cfg: ProbeConfig = ProbeConfig(),
                              device: Union[str, torch.device] = 'cpu') -> Dict[str, dict]:
    """:func:`train_linear_probes` with each layer's own weight decay (layers sharing one are trained together)."""
    results: Dict[str, dict] = {}
    meta = None
    for wd in sorted(set(weight_decays.values())):
        idx = [i for i, n in enumerate(train.names) if weight_decays[n] == wd]
        pick = lambda fs: None if fs is None else FeatureSet([fs.names[i] for i in idx],  # noqa: E731
                                                             [fs.features[i] for i in idx], fs.labels, fs.rows,
                                                             [fs.grids[i] for i in idx], dict(fs.meta))
        res = train_linear_probes(pick(train), pick(val), num_classes, replace(cfg, weight_decay=wd), device=device)
        meta = res.pop('_meta')
        for name, r in res.items():
            results[name] = dict(r, weight_decay=wd)
    ordered = {n: results[n] for n in train.names}
    ordered['_meta'] = dict(meta, config=dict(meta['config'], weight_decay='per layer'))
    return ordered


def format_table(rows: Dict[str, Dict[str, dict]], layers: Optional[Sequence[str]] = None,
                 title: str = 'Model\\Layer', key: str = 'top1') -> str:
    """Rows = models, columns = layers, cells = top-1 %, in the shape of the paper's Table 4."""
    if layers is None:
        layers = []
        for r in rows.values():
            for name in r:
                if not name.startswith('_') and name not in layers:
                    layers.append(name)
    width = max([len(title)] + [len(m) for m in rows]) + 2
    lines = [title.ljust(width) + ''.join(f'{name:>9}' for name in layers)]
    for model, r in rows.items():
        cells = ''.join(f'{r[name][key]:8.1f}%' if name in r else f'{"-":>9}' for name in layers)
        lines.append(model.ljust(width) + cells)
    return '\n'.join(lines)

"""End-to-end evaluation protocols: layerwise linear probes (Tables 4/5) and the STL-10 protocol (Table 2).

* :func:`layerwise_probe`: frozen backbone, every tap pooled to ~9,200 dims, one linear classifier per tap,
  top-1 per layer on a held-out validation part (the last ``val_per_class`` rows of each class, or a separate
  validation split/source).
* :func:`transfer_eval`: the STL-10 protocol generalised to any labelled dataset: ``mode='linear'`` (linear
  classifier on frozen conv5 features, i.e. the last tap) or ``mode='finetune'`` (all layers trained; conv layers
  transferred from the weights file, classifier layers random). With folds (STL-10's ``fold_indices.txt``: ten
  lines of 1,000 training-row indices each, or a fold-id column) one model per fold, reported as mean and SD;
  without folds a single train/validation split.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_spot.data import holdout_split

from .labelled import ImageRows, LabelledData, check_num_classes, collate_skip_none, load_labelled, \
    source_fingerprint, subset_per_class
from .features import TARGET_DIM, FeatureSet, TapExtractor, create_backbone, eval_transform, extract_features, \
    load_or_extract, weights_fingerprint
from .probe import ProbeConfig, select_weight_decay, train_linear_probes, train_probes_per_layer_wd

__all__ = ['default_cache_dir', 'split_rows', 'prepare_features', 'layerwise_probe', 'load_folds', 'transfer_eval',
           'finetune_once']

CACHE_FORMAT = 1


def default_cache_dir() -> str:
    base = os.environ.get('TIMM_SPOT_CACHE') or os.path.join(
        os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')), 'timm_spot')
    return os.path.join(base, 'features')


def _log_default(msg: str) -> None:
    print(msg, flush=True)


def split_rows(train: LabelledData, val: Optional[LabelledData], val_per_class: int = 500,
               train_per_class: Optional[int] = None):
    """(train rows, val data, val rows): a separate validation set when given, else ``holdout_split``."""
    if val is not None:
        train_rows = np.arange(len(train))
        val_rows = np.arange(len(val))
        val_data = val
    else:
        train_rows, val_rows = holdout_split(train.labels, per_class=val_per_class)
        val_data = train
    return subset_per_class(train.labels, train_rows, train_per_class), val_data, val_rows


def prepare_features(
        model_name: str,
        weights: Optional[str],
        data: LabelledData,
        rows: Sequence[int],
        img_size: int,
        crop_pct: Optional[float] = 1.0,
        interpolation: Optional[str] = None,
        target_dim: int = TARGET_DIM,
        taps: Optional[Sequence[int]] = None,
        cache_dir: Optional[str] = None,
        seed: int = 0,
        batch_size: int = 128,
        workers: int = 0,
        model_kwargs: Optional[dict] = None,
        fingerprints: Optional[dict] = None,
        log: Optional[Callable[[str], None]] = None,
        device: str = 'cpu',
) -> FeatureSet:
    """Pooled tap features of ``rows`` of ``data`` for ``model_name`` (+ ``weights``), from the cache if present."""
    import hashlib

    model_kwargs = dict(model_kwargs or {})
    fingerprints = fingerprints if fingerprints is not None else {}
    if 'weights' not in fingerprints:
        fingerprints['weights'] = weights_fingerprint(weights, seed)
    src_key = ('source', data.source)
    if src_key not in fingerprints:
        fingerprints[src_key] = source_fingerprint(data.source)
    rows = np.asarray(rows, dtype=np.int64)
    key = dict(
        format=CACHE_FORMAT, model=model_name, model_kwargs=model_kwargs, weights=fingerprints['weights'],
        source=fingerprints[src_key], split=data.split, image_column=data.image_column,
        label_column=data.label_column, rows=hashlib.sha256(rows.tobytes()).hexdigest(), n_rows=len(rows),
        img_size=img_size, crop_pct=crop_pct, interpolation=interpolation, target_dim=target_dim,
        taps=list(taps) if taps is not None else None, dtype='float32',
    )

    def compute() -> FeatureSet:
        model = create_backbone(model_name, weights, seed=seed, num_classes=0, **model_kwargs)
        model.eval().requires_grad_(False)
        extractor = TapExtractor(model, indices=taps)
        transform = eval_transform(model, img_size, crop_pct=crop_pct, interpolation=interpolation)
        dataset = ImageRows(data.ds, rows, transform, labels=data.labels, image_column=data.image_column)
        if log is not None:
            log(f'  extracting {len(rows)} rows of {data.describe()} with {model_name} at {img_size}px')
        return extract_features(extractor, dataset, img_size, target_dim=target_dim, batch_size=batch_size,
                                num_workers=workers, log=log, device=device)

    return load_or_extract(cache_dir, key, compute, log=log)


def layerwise_probe(
        model_name: str = 'alexnet_spot',
        weights: Optional[str] = None,
        source: Optional[str] = None,
        split: str = 'train',
        val_source: Optional[str] = None,
        val_split: Optional[str] = None,
        image_column: str = 'image',
        label_column: str = 'label',
        num_classes: Optional[int] = None,
        train_per_class: Optional[int] = None,
        val_per_class: int = 500,
        img_size: int = 64,
        crop_pct: Optional[float] = 1.0,
        interpolation: Optional[str] = None,
        target_dim: int = TARGET_DIM,
        taps: Optional[Sequence[int]] = None,
        probe: ProbeConfig = ProbeConfig(),
        cache_dir: Optional[str] = None,
        seed: int = 0,
        batch_size: int = 128,
        workers: int = 0,
        model_kwargs: Optional[dict] = None,
        data: Optional[LabelledData] = None,
        log: Optional[Callable[[str], None]] = _log_default,
        device: str = 'cpu',
        weight_decay_grid: Optional[Sequence[float]] = None,
        weight_decays: Optional[Dict[str, float]] = None,
) -> Dict[str, dict]:
    """Layerwise linear probes of one model; returns ``{layer: {'top1', 'train_top1', 'dim', 'grid'}, '_meta': ...}``.

    The probe's weight decay: ``probe.weight_decay`` for every layer; or each layer's from ``weight_decays``; or
    chosen per layer from ``weight_decay_grid`` on a split of the probe-training rows (``select_weight_decay``; the
    sweep is recorded in ``_meta['weight_decay_sweep']``)."""
    t0 = time.time()
    train = data if data is not None else load_labelled(source, split, image_column, label_column, num_classes)
    if num_classes is not None:
        check_num_classes(train.num_classes, num_classes, label_column, train.source)
    val = None
    if val_source is not None or val_split is not None:
        val = load_labelled(val_source if val_source is not None else source, val_split or split, image_column,
                            label_column, class_names=train.class_names if train.class_names else None)
        _check_val_classes(train, val)
    train_rows, val_data, val_rows = split_rows(train, val, val_per_class, train_per_class)
    fp: dict = {}
    common = dict(img_size=img_size, crop_pct=crop_pct, interpolation=interpolation, target_dim=target_dim,
                  taps=taps, cache_dir=cache_dir, seed=seed, batch_size=batch_size, workers=workers,
                  model_kwargs=model_kwargs, fingerprints=fp, log=log, device=device)
    t1 = time.time()
    ftrain = prepare_features(model_name, weights, train, train_rows, **common)
    fval = prepare_features(model_name, weights, val_data, val_rows, **common)
    t2 = time.time()
    if log is not None:
        log(f'  probing {len(ftrain)} train / {len(fval)} val rows, {train.num_classes} classes, layers ' +
            ', '.join(f'{n} {g[0]}x{g[1]} ({f.shape[1]})' for n, g, f in zip(ftrain.names, ftrain.grids,
                                                                                ftrain.features)))
    sweep = None
    if weight_decays is None and weight_decay_grid:
        sweep = select_weight_decay(ftrain, train.num_classes, weight_decay_grid, probe, device=device)
        weight_decays = {name: v['weight_decay'] for name, v in sweep.items()}
        if log is not None:
            log('  probe weight decay per layer (chosen on probe-training rows): ' +
                ', '.join(f'{n} {w:g}' for n, w in weight_decays.items()))
    if weight_decays is not None:
        results = train_probes_per_layer_wd(ftrain, fval, train.num_classes, weight_decays, probe, device=device)
    else:
        results = train_linear_probes(ftrain, fval, train.num_classes, probe, log=log, device=device)
    if sweep is not None:
        results['_meta']['weight_decay_sweep'] = {n: {str(k): v for k, v in d['sweep'].items()}
                                                  for n, d in sweep.items()}
    results['_meta'].update(
        model=model_name, weights=weights or f'random init (seed {seed})', img_size=img_size,
        seconds_total=round(time.time() - t0, 1), seconds_features=round(t2 - t1, 1),
        features_cached=bool(ftrain.meta.get('cached')) and bool(fval.meta.get('cached')),
        skipped_images=int(ftrain.meta.get('skipped', 0)) + int(fval.meta.get('skipped', 0)),
        taps=ftrain.meta.get('taps'),
    )
    return results


def _check_val_classes(train: LabelledData, val: LabelledData) -> None:
    if val.num_classes > train.num_classes:
        raise ValueError(f'validation label column {val.label_column!r} has {val.num_classes} classes but the '
                         f'training data has {train.num_classes}')


def load_folds(folds: Optional[str], data: LabelledData) -> Optional[List[np.ndarray]]:
    """Training rows of each fold: from an STL-10-style ``fold_indices.txt`` (one line of 0-based row indices per
    fold) or from a column of ``data`` holding a fold id per row (negative = in no fold). ``None`` = no folds."""
    if not folds:
        return None
    names = list(data.ds.column_names)
    if folds in names:
        ids = np.asarray(data.ds[folds], dtype=np.int64)
        out = [np.flatnonzero(ids == f) for f in sorted(set(ids.tolist())) if f >= 0]
    elif os.path.isfile(folds):
        out = []
        with open(folds) as f:
            for line in f:
                if line.strip():
                    out.append(np.asarray([int(v) for v in line.split()], dtype=np.int64))
    else:
        raise ValueError(f'folds {folds!r} is neither a file nor a column of {data.source} (columns: {names})')
    if not out:
        raise ValueError(f'folds {folds!r} defines no fold')
    for i, rows in enumerate(out):
        if len(rows) and (rows.min() < 0 or rows.max() >= len(data)):
            raise ValueError(f'fold {i} of {folds!r} has row indices outside 0..{len(data) - 1}')
    return out


def _mean_sd(values: Sequence[float]):
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def transfer_eval(
        mode: str = 'linear',
        model_name: str = 'alexnet_spot',
        weights: Optional[str] = None,
        source: Optional[str] = None,
        split: str = 'train',
        val_source: Optional[str] = None,
        val_split: Optional[str] = None,
        folds: Optional[str] = None,
        image_column: str = 'image',
        label_column: str = 'label',
        num_classes: Optional[int] = None,
        train_per_class: Optional[int] = None,
        val_per_class: int = 500,
        img_size: int = 96,
        crop_pct: Optional[float] = 1.0,
        probe: ProbeConfig = ProbeConfig(),
        epochs: int = 200,
        lr: float = 1e-3,
        weight_decay: float = 5e-5,
        ft_batch_size: int = 64,
        color_jitter: bool = False,
        max_folds: Optional[int] = None,
        cache_dir: Optional[str] = None,
        seed: int = 0,
        batch_size: int = 128,
        workers: int = 0,
        model_kwargs: Optional[dict] = None,
        log: Optional[Callable[[str], None]] = _log_default,
        device: str = 'cpu',
) -> dict:
    """Table 2 protocol. Returns ``{'mode', 'folds': [top1 per fold], 'mean', 'sd', 'n_folds', ...}``."""
    if mode not in ('linear', 'finetune'):
        raise ValueError(f'mode must be linear or finetune, not {mode!r}')
    t0 = time.time()
    train = load_labelled(source, split, image_column, label_column, num_classes)
    val = None
    if val_source is not None or val_split is not None:
        val = load_labelled(val_source if val_source is not None else source, val_split or split, image_column,
                            label_column, class_names=train.class_names if train.class_names else None)
        _check_val_classes(train, val)
    fold_rows = load_folds(folds, train)
    train_rows, val_data, val_rows = split_rows(train, val, val_per_class, None)
    if fold_rows is None:
        fold_rows = [subset_per_class(train.labels, train_rows, train_per_class)]
    else:
        if val is None:  # never train on the held-out rows
            allowed = set(train_rows.tolist())
            fold_rows = [np.asarray([r for r in f if r in allowed], dtype=np.int64) for f in fold_rows]
        fold_rows = [subset_per_class(train.labels, f, train_per_class) for f in fold_rows]
    if max_folds is not None:
        fold_rows = fold_rows[:max_folds]
    accs, details = [], []
    if mode == 'linear':
        n_taps = len(_taps_of(model_name, model_kwargs))
        fp: dict = {}
        common = dict(img_size=img_size, crop_pct=crop_pct, target_dim=TARGET_DIM, taps=[n_taps - 1],
                      cache_dir=cache_dir, seed=seed, batch_size=batch_size, workers=workers,
                      model_kwargs=model_kwargs, fingerprints=fp, log=log, device=device)
        all_rows = np.unique(np.concatenate(fold_rows))
        ftrain = prepare_features(model_name, weights, train, all_rows, **common)
        fval = prepare_features(model_name, weights, val_data, val_rows, **common)
        for i, rows in enumerate(fold_rows):
            res = train_linear_probes(ftrain.select(ftrain.positions_of(rows)), fval, train.num_classes, probe,
                                      device=device)
            layer = ftrain.names[0]
            accs.append(res[layer]['top1'])
            details.append(dict(fold=i, n_train=len(rows), top1=res[layer]['top1'], layer=layer,
                                dim=res[layer]['dim']))
            if log is not None:
                log(f'  fold {i}: {len(rows)} train rows, {layer} linear top-1 {accs[-1]:.2f}%')
    else:
        for i, rows in enumerate(fold_rows):
            acc = finetune_once(model_name, weights, train, rows, val_data, val_rows, img_size=img_size,
                                crop_pct=crop_pct, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                batch_size=ft_batch_size, color_jitter=color_jitter, seed=seed + i,
                                workers=workers, model_kwargs=model_kwargs, log=log, device=device)
            accs.append(acc)
            details.append(dict(fold=i, n_train=len(rows), top1=acc))
            if log is not None:
                log(f'  fold {i}: {len(rows)} train rows, fine-tuned top-1 {acc:.2f}%')
    mean, sd = _mean_sd(accs)
    return dict(mode=mode, model=model_name, weights=weights or f'random init (seed {seed})', folds=accs,
                details=details, mean=mean, sd=sd, n_folds=len(accs), n_val=len(val_rows),
                num_classes=train.num_classes, seconds=round(time.time() - t0, 1))


def _taps_of(model_name: str, model_kwargs: Optional[dict]) -> list:
    import timm

    import timm_spot  # noqa: F401

    with torch.device('meta'):
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **(model_kwargs or {}))
    from .features import _feature_info_list

    return _feature_info_list(model)


def _evaluate(model: nn.Module, loader, device='cpu') -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in loader:
            if batch is None:
                continue
            x, y, _ = batch
            correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
            total += int(y.numel())
    return 100.0 * correct / max(total, 1)


def finetune_once(
        model_name: str,
        weights: Optional[str],
        train: LabelledData,
        train_rows: Sequence[int],
        val: LabelledData,
        val_rows: Sequence[int],
        img_size: int = 96,
        crop_pct: Optional[float] = 1.0,
        epochs: int = 200,
        lr: float = 1e-3,
        weight_decay: float = 5e-5,
        batch_size: int = 64,
        color_jitter: bool = False,
        seed: int = 0,
        workers: int = 0,
        model_kwargs: Optional[dict] = None,
        log: Optional[Callable[[str], None]] = None,
        device: str = 'cpu',
) -> float:
    """Fine-tune all layers (conv transferred from ``weights``, classifier new) and return validation top-1 %.

    Training augmentation follows the pretraining preprocessing (docs/method.md, preprocessing): random resized crop with area
    0.333..1 and aspect 0.75..1.33, bilinear or bicubic at random, horizontal flip, optional colour jitter
    (brightness 32/255, saturation 0.5..1.5). Adam with a linear learning-rate decay to 0 (the authors' code).
    """
    import timm.data

    model = create_backbone(model_name, weights, seed=seed, num_classes=train.num_classes, **(model_kwargs or {}))
    head_out = getattr(model, 'num_classes', train.num_classes)
    check_num_classes(train.num_classes, head_out, train.label_column, train.source)
    cfg = timm.data.resolve_model_data_config(model)
    model.to(device)
    train_tf = timm.data.create_transform(
        input_size=(3, img_size, img_size), is_training=True, scale=(0.333, 1.0), ratio=(0.75, 4 / 3),
        hflip=0.5, color_jitter=(32 / 255, 0.0, 0.5) if color_jitter else None, interpolation='random',
        mean=cfg['mean'], std=cfg['std'])
    val_tf = eval_transform(model, img_size, crop_pct=crop_pct)
    g = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(
        ImageRows(train.ds, train_rows, train_tf, train.labels, train.image_column), batch_size=batch_size,
        shuffle=True, generator=g, num_workers=workers, collate_fn=collate_skip_none, drop_last=False)
    val_loader = torch.utils.data.DataLoader(
        ImageRows(val.ds, val_rows, val_tf, val.labels, val.image_column), batch_size=128, shuffle=False,
        num_workers=workers, collate_fn=collate_skip_none)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * len(train_loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        seen = loss_sum = 0.0
        for batch in train_loader:
            if batch is None:
                continue
            x, y, _ = batch
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += y.numel()
            loss_sum += float(loss.detach()) * y.numel()
        if log is not None and (epoch + 1 == epochs or (epoch + 1) % max(1, epochs // 5) == 0):
            log(f'  fine-tune epoch {epoch + 1}/{epochs} loss {loss_sum / max(seen, 1):.3f} '
                f'({time.time() - t0:.0f}s)')
    return _evaluate(model, val_loader, device)

"""Frozen-backbone feature taps, Zhang et al.-style pooling to ~9,200 dims per layer, and an on-disk cache.

Works for any timm model that has ``forward_intermediates`` (``alexnet_spot``, ResNets, ViTs, ...) and, as a
fallback, for any model with ``feature_info`` (forward hooks on the tapped modules, i.e. what
``features_only=True`` returns), including models already built with ``features_only=True``.

Pooled grid per tap (Zhang et al. 2016 / paper Tables 4 and 5): ``g = round(sqrt(9200 / C))`` so that the
flattened feature has about 9,200 dimensions, then ``adaptive_avg_pool2d`` to ``(min(g, H), min(g, W))``: a map
that is already smaller than ``g`` is used at its own size. For ``alexnet_spot`` (TF-'SAME' padding, taps after
each ReLU):

=========  ======  ==================  ==================  ==================  ==================
tap (C)    g       32 px               64 px               96 px / 128 px      224 px
=========  ======  ==================  ==================  ==================  ==================
conv1 96   10      8x8 (6,144)         10x10 (9,600)       10x10 (9,600)       10x10 (9,600)
conv2 256  6       4x4 (4,096)         6x6 (9,216)         6x6 (9,216)         6x6 (9,216)
conv3 384  5       2x2 (1,536)         4x4 (6,144)         5x5 (9,600)         5x5 (9,600)
conv4 384  5       2x2 (1,536)         4x4 (6,144)         5x5 (9,600)         5x5 (9,600)
conv5 256  6       2x2 (1,024)         4x4 (4,096)         6x6 (9,216)         6x6 (9,216)
=========  ======  ==================  ==================  ==================  ==================

(map sizes before pooling: conv1 H/4, conv2 H/8, conv3..conv5 H/16.)
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'TARGET_DIM', 'pooled_grid', 'TapExtractor', 'FeatureSet', 'extract_features', 'load_or_extract',
    'feature_cache_key', 'feature_cache_enabled', 'feature_cache_limit_bytes', 'prune_feature_cache',
    'create_backbone', 'weights_fingerprint', 'eval_transform', 'tap_table',
]

TARGET_DIM = 9200


def pooled_grid(channels: int, height: int, width: int, target_dim: int = TARGET_DIM) -> Tuple[int, int]:
    """Pooled grid ``(gh, gw)`` for a ``channels x height x width`` map: ``round(sqrt(target/C))``, capped at the map."""
    g = max(1, int(round(math.sqrt(target_dim / channels))))
    return min(g, int(height)), min(g, int(width))


def _feature_info_list(model) -> List[dict]:
    info = getattr(model, 'feature_info', None)
    if info is None:
        return []
    if hasattr(info, 'get_dicts'):  # FeatureInfo of a features_only model
        return list(info.get_dicts())
    return [dict(d) for d in info]


def _display_names(modules: Sequence[str]) -> List[str]:
    """``features.act1..act5`` (alexnet_spot's post-ReLU taps) read as conv1..conv5; other models keep module names."""
    matches = [re.search(r'(?:^|[._])act(\d+)$', m or '') for m in modules]
    if modules and all(matches):
        names = [f'conv{m.group(1)}' for m in matches]
        if len(set(names)) == len(names):
            return names
    names = [m if m else f'tap{i}' for i, m in enumerate(modules)]
    return names if len(set(names)) == len(names) else [f'tap{i}' for i in range(len(modules))]


class TapExtractor(nn.Module):
    """Wrap a (frozen) timm model so ``forward(x)`` returns the list of its tapped feature maps (NCHW).

    Args:
        model: a timm model (``forward_intermediates`` or ``feature_info``) or a ``features_only`` model.
        indices: which taps (default: all of ``feature_info``).
        method: ``'auto'`` (forward_intermediates, else hooks), ``'intermediates'``, ``'hooks'`` or ``'features'``
            (the model itself returns a list of maps, as ``features_only=True`` models do).
    """

    def __init__(self, model: nn.Module, indices: Optional[Sequence[int]] = None, method: str = 'auto'):
        super().__init__()
        self.model = model
        info = _feature_info_list(model)
        if indices is None:
            if not info:
                raise ValueError(f'{type(model).__name__} has no feature_info: cannot tell which layers to probe')
            indices = list(range(len(info)))
        self.indices = [int(i) for i in indices]
        if method == 'auto':
            if getattr(model, 'is_features_only', False) or type(model).__name__.startswith('Feature'):
                method = 'features'
            elif hasattr(model, 'forward_intermediates'):
                method = 'intermediates'
            else:
                method = 'hooks'
        self.method = method
        modules = [info[i].get('module', '') if i < len(info) else '' for i in self.indices]
        self.modules_tapped = modules
        self.names = _display_names(modules)
        self._hooked: List[Any] = []
        if method == 'hooks':
            if not all(modules):
                raise ValueError(f'{type(model).__name__}: feature_info names no module for some taps {modules}')
            lookup = dict(model.named_modules())
            for m in modules:
                if m not in lookup:
                    raise ValueError(f'{type(model).__name__} has no module {m!r} (from feature_info)')
            self._targets = [lookup[m] for m in modules]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.method == 'intermediates':
            try:
                maps = self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)
            except NotImplementedError:
                self.method = 'hooks'
                lookup = dict(self.model.named_modules())
                self._targets = [lookup[m] for m in self.modules_tapped]
                return self.forward(x)
        elif self.method == 'features':
            maps = self.model(x)
            maps = [maps[i] for i in self.indices] if len(maps) != len(self.indices) else list(maps)
        else:
            captured: Dict[int, torch.Tensor] = {}
            handles = [t.register_forward_hook(lambda _m, _i, out, k=k: captured.__setitem__(k, out))
                       for k, t in enumerate(self._targets)]
            try:
                self.model(x)
            finally:
                for h in handles:
                    h.remove()
            maps = [captured[k] for k in range(len(self._targets))]
        maps = list(maps)
        if len(maps) != len(self.indices):
            raise RuntimeError(f'expected {len(self.indices)} feature maps, model returned {len(maps)}')
        out = []
        for name, t in zip(self.names, maps):
            if isinstance(t, (tuple, list)):
                t = t[0]
            if t.ndim == 2:
                t = t[:, :, None, None]
            if t.ndim != 4:
                raise ValueError(f'tap {name} gives a {t.ndim}-d tensor {tuple(t.shape)}; expected NCHW maps')
            out.append(t)
        return out


def tap_table(extractor: TapExtractor, img_size: int, target_dim: int = TARGET_DIM, in_chans: int = 3) -> List[dict]:
    """Per tap: name, channels, map size at ``img_size`` and pooled grid/dims (one dummy forward pass)."""
    was_training = extractor.training
    extractor.eval()
    with torch.no_grad():
        maps = extractor(torch.zeros(1, in_chans, img_size, img_size))
    extractor.train(was_training)
    rows = []
    for name, t in zip(extractor.names, maps):
        c, h, w = t.shape[1:]
        gh, gw = pooled_grid(c, h, w, target_dim)
        rows.append(dict(name=name, channels=int(c), map=(int(h), int(w)), grid=(gh, gw), dim=int(c * gh * gw)))
    return rows


def pool_maps(maps: Sequence[torch.Tensor], grids: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
    """Adaptive average pooling of each map to its grid, flattened to ``(B, C*gh*gw)``."""
    return [F.adaptive_avg_pool2d(m, g).flatten(1) for m, g in zip(maps, grids)]


@dataclass
class FeatureSet:
    """Pooled features of a set of rows: one float tensor ``(N, D_l)`` per tap, plus labels and row ids."""
    names: List[str]
    features: List[torch.Tensor]
    labels: torch.Tensor
    rows: torch.Tensor
    grids: List[Tuple[int, int]]
    meta: dict = field(default_factory=dict)

    def __len__(self):
        return int(self.labels.shape[0])

    def select(self, positions) -> 'FeatureSet':
        """Subset by position (not by row id)."""
        p = torch.as_tensor(np.asarray(positions), dtype=torch.long)
        return FeatureSet(self.names, [f[p] for f in self.features], self.labels[p], self.rows[p], self.grids,
                          dict(self.meta))

    def positions_of(self, rows) -> np.ndarray:
        """Positions of the given row ids (rows that were skipped as unreadable are left out)."""
        where = {int(r): i for i, r in enumerate(self.rows.tolist())}
        return np.asarray([where[int(r)] for r in rows if int(r) in where], dtype=np.int64)

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        tensors = {f'feat.{i}': f.contiguous() for i, f in enumerate(self.features)}
        tensors['labels'] = self.labels.contiguous()
        tensors['rows'] = self.rows.contiguous()
        meta = {'names': json.dumps(self.names), 'grids': json.dumps([list(g) for g in self.grids]),
                'meta': json.dumps(self.meta, default=str)}
        tmp = f'{path}.tmp{os.getpid()}'
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> 'FeatureSet':
        from safetensors import safe_open

        with safe_open(path, framework='pt') as f:
            md = f.metadata()
            names = json.loads(md['names'])
            feats = [f.get_tensor(f'feat.{i}') for i in range(len(names))]
            labels, rows = f.get_tensor('labels'), f.get_tensor('rows')
        return cls(names, feats, labels, rows, [tuple(g) for g in json.loads(md['grids'])], json.loads(md['meta']))


def weights_fingerprint(weights: Optional[str], seed: int = 0) -> str:
    """Content hash of a weights file, or ``random-seed<N>`` for a random initialisation."""
    from timm_spot.hashing import file_sha256

    return file_sha256(weights) if weights else f'random-seed{seed}'


def create_backbone(model_name: str, weights: Optional[str] = None, seed: int = 0, num_classes: int = 0,
                    **model_kwargs) -> nn.Module:
    """``timm.create_model`` with ``weights`` loaded as its pretrained file (head adapted), or seeded random init.

    The weights go through timm's own pretrained loader (``pretrained_cfg_overlay=dict(file=...)``, so the model's
    ``pretrained_filter_fn`` applies, e.g. to discriminator checkpoints); a file that shares no tensor name with the
    model is rejected instead of silently leaving the model random.
    """
    import timm

    import timm_spot  # noqa: F401  (registers the models)

    torch.manual_seed(seed)
    if weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f'weights file {weights!r} does not exist')
        model = timm.create_model(model_name, pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay=dict(file=weights), **model_kwargs)
        _check_weights_overlap(model, weights, model_name)
        check_finite_weights(model, weights)
    else:
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **model_kwargs)
    return model


def check_finite_weights(model: nn.Module, weights: Optional[str] = None) -> None:
    """Raise ``ValueError`` naming the file and a tensor when any parameter or buffer is NaN or infinite (a
    diverged run's weights give results that look normal: chance accuracy, p(real) = nan)."""
    bad = [name for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        where = f'weights file {weights!r}' if weights else 'the model'
        raise ValueError(f'{where} holds non-finite values (NaN or inf) in {len(bad)} tensor(s), e.g. {bad[0]!r}: '
                         f'the training diverged or the file is corrupt; use weights from an earlier checkpoint')


def _check_weights_overlap(model: nn.Module, weights: str, model_name: str) -> None:
    from timm.models import load_state_dict

    try:
        keys = set(load_state_dict(weights).keys())
    except Exception as e:  # noqa: BLE001
        raise ValueError(f'cannot read weights file {weights!r}: {e}') from None
    own = set(model.state_dict().keys())
    if not keys & own and not any(k.split('.', 1)[-1] in own for k in keys):
        raise ValueError(f'weights file {weights!r} shares no parameter name with {model_name} '
                         f'(file has e.g. {sorted(keys)[:3]}, model has e.g. {sorted(own)[:3]})')


def eval_transform(model: nn.Module, img_size: int, crop_pct: Optional[float] = None,
                   interpolation: Optional[str] = None):
    """Deterministic eval transform with the model's own normalisation (from its pretrained cfg).

    Resize the shorter side to ``img_size / crop_pct``, centre-crop ``img_size``, normalise with the cfg's mean/std
    (alexnet_spot: 0..255 RGB minus the channel means). ``crop_pct=1`` keeps the whole (square) image.
    """
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    return timm.data.create_transform(
        input_size=(3, img_size, img_size), is_training=False, mean=cfg['mean'], std=cfg['std'],
        crop_pct=cfg.get('crop_pct', 1.0) if crop_pct is None else crop_pct,
        interpolation=interpolation or cfg.get('interpolation', 'bilinear'),
    )


@torch.no_grad()
def extract_features(
        extractor: TapExtractor,
        dataset: torch.utils.data.Dataset,
        img_size: int,
        target_dim: int = TARGET_DIM,
        batch_size: int = 128,
        num_workers: int = 0,
        dtype: torch.dtype = torch.float32,
        log: Optional[Callable[[str], None]] = None,
        device: Union[str, torch.device] = 'cpu',
) -> FeatureSet:
    """Run the frozen extractor over ``dataset`` (items ``(image, label, row)``) and pool every tap.

    The model runs on ``device``; pooled features are returned on the CPU.

    Unreadable images (``None`` items) are dropped and counted in ``meta['skipped']``.
    """
    from .labelled import collate_skip_none

    extractor.eval()
    table = tap_table(extractor.cpu(), img_size, target_dim)
    extractor.to(device)
    grids = [r['grid'] for r in table]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         collate_fn=collate_skip_none)
    n = len(dataset)
    feats = [torch.empty(n, r['dim'], dtype=dtype) for r in table]
    labels = torch.empty(n, dtype=torch.long)
    rows = torch.empty(n, dtype=torch.long)
    filled, seen, t0 = 0, 0, time.time()
    for batch in loader:
        seen += batch_size
        if batch is None:
            continue
        x, y, r = batch
        b = x.shape[0]
        for f, p in zip(feats, pool_maps(extractor(x.to(device, non_blocking=True)), grids)):
            f[filled:filled + b] = p.to('cpu', dtype)
        labels[filled:filled + b] = y
        rows[filled:filled + b] = r
        filled += b
        if log is not None and (filled // batch_size) % 20 == 0:
            log(f'  features {filled}/{n} ({time.time() - t0:.0f}s)')
    skipped = n - filled
    if log is not None and skipped:
        log(f'  skipped {skipped} unreadable image(s)')
    meta = dict(skipped=skipped, img_size=img_size, taps=table, seconds=round(time.time() - t0, 2))
    return FeatureSet(list(extractor.names), [f[:filled] for f in feats], labels[:filled], rows[:filled], grids, meta)


def feature_cache_key(**parts) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


FEATURE_CACHE_GB_DEFAULT = 2.0


def feature_cache_enabled() -> bool:
    """False when ``TIMM_SPOT_FEATURE_CACHE`` is ``0``/``false``/``no``/``off``: probes then neither read nor
    write cached features (the CLI's ``--no-feature-cache`` does the same for one command)."""
    return os.environ.get('TIMM_SPOT_FEATURE_CACHE', '1').strip().lower() not in ('0', 'false', 'no', 'off')


def feature_cache_limit_bytes() -> int:
    """Size bound of the feature cache: ``TIMM_SPOT_FEATURE_CACHE_GB`` (default 2) GB. Probes of a few runs
    otherwise leave several GB behind without anyone noticing."""
    raw = os.environ.get('TIMM_SPOT_FEATURE_CACHE_GB')
    try:
        gb = float(raw) if raw not in (None, '') else FEATURE_CACHE_GB_DEFAULT
    except ValueError:
        raise ValueError(f'TIMM_SPOT_FEATURE_CACHE_GB must be a number of GB, got {raw!r}') from None
    return max(0, int(gb * 1e9))


def prune_feature_cache(cache_dir: str, limit_bytes: Optional[int] = None, keep: Sequence[str] = ()) -> List[str]:
    """Delete the least recently used ``features-*.safetensors`` in ``cache_dir`` until the folder's cache files
    total at most ``limit_bytes`` (default :func:`feature_cache_limit_bytes`); files in ``keep`` stay. Returns the
    deleted paths."""
    limit = feature_cache_limit_bytes() if limit_bytes is None else limit_bytes
    keep = {os.path.abspath(k) for k in keep}
    entries = []
    for name in os.listdir(cache_dir):
        if not (name.startswith('features-') and name.endswith('.safetensors')):
            continue
        path = os.path.join(cache_dir, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        entries.append((st.st_mtime, st.st_size, path))
    total = sum(e[1] for e in entries)
    removed = []
    for _, size, path in sorted(entries):  # oldest (least recently used: reads touch the file) first
        if total <= limit:
            break
        if os.path.abspath(path) in keep:
            continue
        try:
            os.remove(path)
        except OSError:
            continue
        total -= size
        removed.append(path)
    return removed


def load_or_extract(
        cache_dir: Optional[str],
        key_parts: dict,
        compute: Callable[[], FeatureSet],
        log: Optional[Callable[[str], None]] = None,
) -> FeatureSet:
    """Return cached features for ``key_parts`` from ``cache_dir``, or compute, save and return them.

    The key covers everything the features depend on (model name and kwargs, weights content hash or random seed,
    data source fingerprint, split, row indices, image size, crop, pooling target, dtype); the file name is its hash
    and the full key is stored in the file's metadata. ``TIMM_SPOT_FEATURE_CACHE=0`` turns the cache off; after a
    write the folder is pruned to :func:`feature_cache_limit_bytes` (least recently used files go first).
    """
    if not cache_dir or not feature_cache_enabled():
        return compute()
    os.makedirs(cache_dir, exist_ok=True)
    key = feature_cache_key(**key_parts)
    path = os.path.join(cache_dir, f'features-{key}.safetensors')
    if os.path.isfile(path):
        try:
            fs = FeatureSet.load(path)
            os.utime(path)  # most recently used: pruned last
            if log is not None:
                log(f'  features from cache {path}')
            fs.meta['cache'] = path
            fs.meta['cached'] = True
            return fs
        except Exception as e:  # noqa: BLE001  (a truncated/corrupt cache file is recomputed)
            if log is not None:
                log(f'  ignoring unreadable cache file {path}: {e}')
    fs = compute()
    fs.meta['key'] = key_parts
    fs.save(path)
    fs.meta['cache'] = path
    fs.meta['cached'] = False
    removed = prune_feature_cache(cache_dir, keep=[path])
    if log is not None:
        log(f'  features cached to {path} (cache bound {feature_cache_limit_bytes() / 1e9:g} GB: '
            f'TIMM_SPOT_FEATURE_CACHE_GB; off: TIMM_SPOT_FEATURE_CACHE=0 or --no-feature-cache)')
        if removed:
            log(f'  removed {len(removed)} least recently used cache file(s) to stay within the bound')
    return fs

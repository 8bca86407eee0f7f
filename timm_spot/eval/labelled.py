"""Labelled image data for evaluation: a ``datasets`` dataset plus integer labels, checked up front.

Everything goes through :func:`timm_spot.data.load_image_source` (Hub id, image folder, Parquet/Arrow files),
so evaluation accepts exactly the sources pretraining accepts. Labels may be a ``ClassLabel`` column,
integers, or strings (mapped to integers in sorted order).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from timm_spot.data import decode_image, load_image_source
from timm_spot.hashing import file_sha256

__all__ = [
    'LabelledData', 'load_labelled', 'check_num_classes', 'ImageRows', 'collate_skip_none', 'subset_per_class',
    'source_fingerprint', 'file_sha256', 'open_image', 'single_thread',
]


@contextlib.contextmanager
def single_thread():
    """Run per-image tensor ops with one intra-op thread.

    Tiny tensors (one 64..224-px image) gain nothing from a thread pool, and on a busy machine an OpenMP barrier per
    op can cost more than the op itself. Batched model forward passes keep the configured thread count.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class LabelledData:
    """A labelled image source: encoded-image dataset, integer labels and class names."""
    ds: Any
    labels: np.ndarray
    num_classes: int
    class_names: Optional[List[str]]
    source: Optional[str]
    split: str
    image_column: str = 'image'
    label_column: str = 'label'
    extra: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.labels)

    def describe(self) -> str:
        return f'{self.source or "builtin"} [{self.split}] ({len(self)} rows, {self.num_classes} classes)'


def load_labelled(
        source: Optional[str],
        split: str = 'train',
        image_column: str = 'image',
        label_column: str = 'label',
        num_classes: Optional[int] = None,
        class_names: Optional[Sequence[str]] = None,
) -> LabelledData:
    """Open a labelled image source; fail early with a message naming the missing column or wrong class count.

    Args:
        source: anything :func:`timm_spot.data.load_image_source` accepts.
        split: split to load (local files are all ``train``).
        image_column / label_column: column names; a missing one raises ``ValueError`` naming it.
        num_classes: if given, the number of classes the model head (or caller) expects; a different count in
            the data raises ``ValueError`` stating both counts.
        class_names: string labels are mapped with this order (e.g. the train split's), instead of sorted order.
    """
    import datasets

    ds = load_image_source(source, split=split, image_column=image_column, label_column=label_column)
    if isinstance(ds, datasets.IterableDataset):  # pragma: no cover - load_image_source(streaming=False)
        raise ValueError('evaluation needs a map-style dataset (streaming=False)')
    feature = ds.features[label_column]
    raw = ds[label_column] if len(ds) else []
    where = f'label column {label_column!r} of {source or "builtin"} [{split}]'
    names: Optional[List[str]] = None
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        labels = np.asarray(raw, dtype=np.int64)
        count = len(names)
    elif len(raw) and isinstance(raw[0], str):
        names = list(class_names) if class_names is not None else sorted(set(raw))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(raw) - set(index))
        if unknown:
            raise ValueError(f'{where} has labels {unknown[:5]} that are not among the classes {names[:10]}')
        labels = np.asarray([index[v] for v in raw], dtype=np.int64)
        count = len(names)
    else:
        try:
            values = np.asarray(raw)
            if values.dtype == bool or values.dtype.kind not in 'iuf':
                raise TypeError(f'values of type {values.dtype}')
            if values.dtype.kind == 'f':  # 1.0, 2.0 are class ids; 0.5 or NaN is not (int64 would truncate it)
                bad = ~np.isfinite(values) | (values != np.round(values))
                if bad.any():
                    first = int(np.flatnonzero(bad)[0])
                    raise ValueError(f'{int(bad.sum())} non-integer value(s), e.g. {values[first]!r} in row {first}; '
                                     f'class labels must be integers (pick the label column with --label-column)')
            labels = values.astype(np.int64)
        except (TypeError, ValueError) as e:
            raise ValueError(f'{where} does not hold class labels (int, str or ClassLabel): {e}') from None
        if labels.ndim != 1:
            raise ValueError(f'{where} does not hold one class label per row (shape {labels.shape})')
        _check_label_range(labels, where)
        count = int(labels.max()) + 1 if len(labels) else 0
        if class_names is not None:
            names = list(class_names)
            count = max(count, len(names))
    if len(labels) == 0:
        raise ValueError(f'{source or "builtin"} [{split}] has no rows')
    if labels.min() < 0:
        raise ValueError(f'{where} has {int((labels < 0).sum())} unlabelled rows (label < 0); '
                         'evaluate on a labelled split')
    if num_classes is not None:
        check_num_classes(count, num_classes, label_column=label_column, source=source)
    return LabelledData(
        ds=ds, labels=labels, num_classes=count, class_names=names, source=source, split=split,
        image_column=image_column, label_column=label_column,
    )


MAX_CLASSES = 100_000  # a head this wide is a data error long before it is a dataset (ImageNet-21k: 21,843)


def _check_label_range(labels: np.ndarray, where: str) -> None:
    """Integer labels set the head size (max + 1): one stray label 1,000,000 among 10 classes would build a
    1,000,001-class head (gigabytes). Refused: a max label above :data:`MAX_CLASSES`, or more than 10x the number
    of distinct labels (and above 1000, so small subsets of a dataset with gaps still pass)."""
    if not len(labels):
        return
    top = int(labels.max())
    distinct = len(np.unique(labels))
    if top + 1 > MAX_CLASSES or (top + 1 > 1000 and top + 1 > 10 * distinct):
        row = int(np.argmax(labels))
        raise ValueError(f'{where} has label {top} (row {row}) far outside the {distinct} distinct labels seen: the '
                         f'head would need {top + 1} outputs; fix or drop that row (or choose the label column with '
                         f'--label-column)')


def check_num_classes(data_classes: int, expected: int, label_column: str = 'label', source=None,
                      what: str = 'the classifier head') -> None:
    """Raise ``ValueError`` naming both counts when the data's class count differs from ``expected``."""
    if int(data_classes) != int(expected):
        raise ValueError(
            f'label column {label_column!r} of {source or "builtin"} has {data_classes} classes but {what} '
            f'has {expected} outputs (num_classes={expected})')


def subset_per_class(labels: np.ndarray, rows: np.ndarray, per_class: Optional[int]) -> np.ndarray:
    """The first ``per_class`` rows of each class among ``rows`` (all of them when ``per_class`` is None)."""
    rows = np.asarray(rows)
    if per_class is None:
        return rows
    keep = []
    for c in np.unique(labels[rows]):
        keep.append(rows[labels[rows] == c][:per_class])
    return np.sort(np.concatenate(keep))


class ImageRows(torch.utils.data.Dataset):
    """Rows of a ``datasets`` dataset as ``(image tensor, label, row)``; ``None`` for an unreadable image."""

    def __init__(self, ds, rows: Sequence[int], transform: Callable, labels: Optional[np.ndarray] = None,
                 image_column: str = 'image'):
        self.ds = ds.select_columns([image_column]) if hasattr(ds, 'select_columns') else ds
        self.rows = np.asarray(rows, dtype=np.int64)
        self.transform = transform
        self.labels = labels
        self.image_column = image_column

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = int(self.rows[i])
        image = decode_image(self.ds[row][self.image_column])
        if image is None:
            return None
        label = int(self.labels[row]) if self.labels is not None else -1
        with single_thread():
            x = self.transform(image)
        return x, label, row


def collate_skip_none(batch):
    """Default collate after dropping unreadable images (``None``); ``None`` if the whole batch was bad."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return torch.utils.data.default_collate(batch)


def source_fingerprint(source: Optional[str]) -> str:
    """A string that changes when the data behind ``source`` changes (for feature-cache keys).

    Local files: content hash (Parquet/Arrow) or, for folders, the list of (path, size, mtime). Hub ids and the
    built-in set: the name itself.
    """
    import glob

    if source is None:
        return 'builtin'
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        entries = []
        for root, _, files in os.walk(path):
            for name in sorted(files):
                full = os.path.join(root, name)
                st = os.stat(full)
                entries.append((os.path.relpath(full, path), st.st_size, int(st.st_mtime)))
        return 'dir:' + hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()
    files = sorted(glob.glob(path)) if any(c in path for c in '*?[') else ([path] if os.path.isfile(path) else [])
    if files:
        return 'files:' + hashlib.sha256(''.join(file_sha256(f) for f in files).encode()).hexdigest()
    return 'hub:' + source


def open_image(path: str) -> Image.Image:
    """Open an image file as RGB; a clear error naming the file when it is missing or not an image."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'image file {path!r} does not exist')
    if os.path.isdir(path):
        raise ValueError(f'image file {path!r} is a folder, not an image')
    try:
        with Image.open(path) as probe:
            probe.size
    except Image.DecompressionBombError as e:
        raise ValueError(f'image file {path!r} is too large to decode safely: {e} (PIL\'s decompression-bomb limit, '
                         f'PIL.Image.MAX_IMAGE_PIXELS); downscale the image first') from None
    except Exception:  # noqa: BLE001  (not an image: decode_image below says so)
        pass
    image = decode_image(path)
    if image is None:
        raise ValueError(f'cannot read image file {path!r}: not an image PIL can decode (or truncated/corrupt)')
    return image

"""Resolve a data source string into a ``datasets`` dataset, and decode its images robustly.

One function, :func:`load_image_source`, serves pretraining and evaluation alike:

* ``None`` or ``"builtin"``: a few real photographs shipped with scikit-image (no download), for demos.
* a folder: ``datasets``' ``imagefolder`` builder (class sub-folders become a ``label`` column).
* Parquet / Arrow files or globs (``$TIMM_SPOT_DATA/cifar10/train.parquet``, ``data/*.parquet``).
* anything else: a Hugging Face Hub dataset id (``ILSVRC/imagenet-1k``, ``tanganke/stl10``), optionally streamed.

Images are kept *encoded* (``datasets.Image(decode=False)``) and decoded by :func:`decode_image`, so that one
unreadable file is skipped and counted by the caller instead of crashing a long run, and every mode
(L, LA, P, RGBA, CMYK, I;16) ends up as 8-bit RGB.
"""
from __future__ import annotations

import glob
import io
import os
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

BUILTIN_SOURCE = 'builtin'

# images above this many pixels are reduced while decoding (JPEG: by the decoder's draft mode; others: by an
# integer box reduce) so no caller converts a 10000 x 10000 photo to float whole. No training crop or evaluation
# resize needs more than 4096 x 4096 source pixels.
MAX_DECODE_PIXELS = 4096 * 4096
_ORIENTATION = 0x0112

# scikit-image sample images that ship inside its wheel (no pooch download); real photographs plus a
# few grayscale / RGBA ones so the default job also exercises mode conversion.
_SKIMAGE_NAMES = (
    'astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry', 'retina',
    'colorwheel', 'camera', 'coins', 'moon', 'clock', 'stereo_motorcycle', 'logo', 'brick', 'grass', 'gravel',
)

_FILE_BUILDERS = {'.parquet': 'parquet', '.arrow': 'arrow', '.csv': 'csv', '.json': 'json', '.jsonl': 'json'}


def builtin_sample_images():
    """The built-in default data set: scikit-image's bundled photographs as a ``datasets.Dataset``.

    Columns: ``image`` (encoded PNG, ``datasets.Image(decode=False)``) and ``name``. Needs no network.
    """
    import datasets
    import skimage.data

    images, names = [], []
    for name in _SKIMAGE_NAMES:
        try:
            array = getattr(skimage.data, name)()
        except Exception:  # a sample that needs a download in this scikit-image version: skip it
            continue
        if isinstance(array, tuple):  # stereo pairs
            array = array[0]
        array = np.asarray(array)
        if array.dtype != np.uint8:
            array = (array.astype(np.float64) * (255.0 / max(float(array.max()), 1e-8))).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format='PNG')
        images.append({'bytes': buffer.getvalue(), 'path': f'{name}.png'})
        names.append(name)
    if not images:
        raise RuntimeError('scikit-image ships none of its sample images here; pass a data source instead')
    features = datasets.Features({'image': datasets.Image(decode=False), 'name': datasets.Value('string')})
    return datasets.Dataset.from_dict({'image': images, 'name': names}, features=features)


def _file_builder(paths: Sequence[str]) -> Optional[str]:
    exts = {os.path.splitext(p)[1].lower() for p in paths}
    builders = {_FILE_BUILDERS.get(e) for e in exts}
    if len(builders) == 1 and None not in builders:
        return builders.pop()
    return None


def load_image_source(
        source: Optional[str] = None,
        split: str = 'train',
        streaming: bool = False,
        image_column: str = 'image',
        label_column: Optional[str] = None,
        decode: bool = False,
):
    """Open ``source`` as a ``datasets`` (Iterable)Dataset whose ``image_column`` holds images.

    Args:
        source: ``None``/``"builtin"``, a folder, Parquet/Arrow file(s) or glob, or a Hub dataset id.
        split: split to load (local files all land in ``train``).
        streaming: return an ``IterableDataset`` (large Hub sets; shard it with
            ``datasets.distributed.split_dataset_by_node``).
        image_column: the column that must hold images.
        label_column: if given, must exist too (evaluation needs labels).
        decode: keep ``datasets``' own decoding (PIL images) instead of encoded bytes.

    Raises:
        FileNotFoundError: a local path or glob that matches nothing.
        ValueError: a required column is missing (the message lists the columns there are).
    """
    import datasets

    if source is None or source == BUILTIN_SOURCE:
        ds = builtin_sample_images()
        if streaming:
            ds = ds.to_iterable_dataset()
    else:
        expanded = os.path.expanduser(source)
        if os.path.isdir(expanded):
            ds = datasets.load_dataset('imagefolder', data_dir=expanded, split=split, streaming=streaming)
        elif any(c in expanded for c in '*?[') or os.path.splitext(expanded)[1].lower() in _FILE_BUILDERS:
            paths = sorted(glob.glob(expanded))
            if not paths:
                raise FileNotFoundError(f'data source {source!r} matches no file')
            builder = _file_builder(paths)
            if builder is None:
                raise ValueError(f'data source {source!r}: cannot tell the file format of {paths[:3]}')
            try:
                ds = datasets.load_dataset(builder, data_files=paths, split='train', streaming=streaming)
            except ValueError as e:
                if 'corresponds to no data' in str(e) or 'no data' in str(e).lower():
                    raise ValueError(f'data source {source!r} holds no rows (an empty file?): pass files with '
                                     f'images') from None
                raise
        elif os.path.sep in source and not os.path.exists(expanded) and source.startswith(('.', '/', '~')):
            raise FileNotFoundError(f'data source {source!r} does not exist')
        else:
            ds = _load_hub_dataset(datasets, source, split, streaming)

    check_columns(ds, image_column, label_column, source=source)
    if not streaming and hasattr(ds, '__len__') and len(ds) == 0:
        raise ValueError(f'data source {source!r} [{split}] holds no rows (an empty file or split?): pass data with '
                         f'images')
    if not decode and isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


class DatasetNotDownloadedError(ConnectionError, FileNotFoundError):
    """A Hub dataset that is not in the local cache while the Hub cannot be reached. Also a FileNotFoundError, so
    the ``timm-spot`` command and ``pretrain.py`` report it as an input error: one line, exit code 2."""


def _load_hub_dataset(datasets, source: str, split: str, streaming: bool):
    """``datasets.load_dataset`` of a Hub dataset id, failing at once with one clear line when it is not in the
    local cache and the Hub cannot be reached (``datasets`` otherwise retries for about half a minute and ends in a
    long traceback)."""
    from timm_spot.models._spot_builder import hub_offline_reason

    reason = hub_offline_reason()
    if reason is None:
        return datasets.load_dataset(source, split=split, streaming=streaming)
    try:  # offline: the local datasets cache only
        from unittest import mock

        with mock.patch.object(datasets.config, 'HF_HUB_OFFLINE', True), \
                mock.patch.object(datasets.config, 'HF_DATASETS_OFFLINE', True, create=True):
            return datasets.load_dataset(source, split=split, streaming=streaming)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as e:
        raise DatasetNotDownloadedError(
            f'data source {source!r} is a Hugging Face Hub dataset that must be downloaded, and it is not in the '
            f'local cache while the Hub cannot be reached ({reason}): run once with network access (unset '
            f'HF_HUB_OFFLINE), or pass local files (Parquet/Arrow/image folder) with --data '
            f'[{type(e).__name__}]') from None


def check_columns(ds, image_column: str = 'image', label_column: Optional[str] = None, source: Any = None) -> None:
    """Raise a ValueError naming the missing column(s) and the columns that exist."""
    features = getattr(ds, 'features', None)
    names = list(features.keys()) if features is not None else list(getattr(ds, 'column_names', None) or [])
    where = f' in data source {source!r}' if source is not None else ''
    for role, column in (('image', image_column), ('label', label_column)):
        if column is not None and names and column not in names:
            raise ValueError(f'{role} column {column!r} not found{where}; columns are {names}')


def decode_image(value: Any) -> Optional[Image.Image]:
    """Decode one ``image`` cell (dict with bytes/path, PIL image, array, or path) to 8-bit RGB.

    Returns ``None`` when the image cannot be read, so callers can skip and count it.
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            if value.get('bytes') is not None:
                image = Image.open(io.BytesIO(value['bytes']))
            elif value.get('path'):
                image = Image.open(value['path'])
            else:
                return None
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str):
            image = Image.open(value)
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(value)
        else:
            return None
        return _finish_decode(image)
    except Exception:  # truncated, corrupt, unsupported, decompression bomb: the caller counts it
        return None


def _finish_decode(image: Image.Image, max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """Load (reduced when huge), apply the EXIF orientation, convert to 8-bit RGB."""
    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001  (a broken EXIF block: keep the pixels as stored)
        orientation = 1
    pixels = image.width * image.height
    if pixels > max_pixels:
        factor = int(np.ceil(np.sqrt(pixels / max_pixels)))
        if image.format == 'JPEG':  # decode at 1/2, 1/4 or 1/8 scale directly
            image.draft(image.mode, (max(1, image.width // factor), max(1, image.height // factor)))
        image.load()
        if image.width * image.height > max_pixels:
            image = image.reduce(int(np.ceil(np.sqrt(image.width * image.height / max_pixels))))
    else:
        image.load()
    if orientation not in (None, 1):
        image.getexif()[_ORIENTATION] = orientation  # reduce() drops the EXIF block: keep the tag
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == 'RGB':
        return image
    if image.mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        array = np.asarray(image, dtype=np.float64)
        span = max(array.max() - array.min(), 1e-8)
        image = Image.fromarray(((array - array.min()) * (255.0 / span)).astype(np.uint8))
    if image.mode in ('RGBA', 'LA', 'PA') or (image.mode == 'P' and 'transparency' in image.info):
        rgba = image.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return image.convert('RGB')  # L, P, CMYK, YCbCr, 1


def holdout_split(
        labels: Union[Sequence[int], np.ndarray],
        per_class: int = 500,
) -> Tuple[np.ndarray, np.ndarray]:
    """Split row indices into (train, validation): the LAST ``per_class`` rows of every class are held out.

    Deterministic and label-balanced, so every report on the CIFAR-10 training split uses the same
    validation images (the data has no test split; never train on the held-out part).
    """
    labels = np.asarray(labels)
    val = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) <= per_class:
            raise ValueError(f'class {c} has {len(rows)} rows, cannot hold out {per_class}')
        val.append(rows[-per_class:])
    val_idx = np.sort(np.concatenate(val))
    mask = np.ones(len(labels), dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx

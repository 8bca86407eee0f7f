"""Training data: Hugging Face ``datasets`` sources, the paper's augmentation, deterministic per-process batches.

Every random draw of the input pipeline comes from a ``numpy.random.Generator`` seeded by
``(seed, stage, step, process index, sample index)``, and the sample order is a per-epoch permutation seeded by
``(seed, stage, epoch)``. The batch of process ``r`` at step ``s`` is therefore a pure function of ``(s, r)``:
resuming needs only the step (the "data position"), no worker or sampler state, and processes never draw the same
sample in a step (process ``r`` takes slice ``r`` of the global batch).

Streaming datasets (Hub ids with ``streaming: true``) are sharded with
``datasets.distributed.split_dataset_by_node``; their position is (epoch, examples consumed) per process, restored
with ``IterableDataset.skip`` (exact order on resume needs the same process count). ``datasets``' own resumable
state (``IterableDataset.state_dict``) is not used: it does not save the shuffle buffer's content, which is refilled on
load, so a resumed run would see other examples than an uninterrupted one (huggingface/datasets#7444).
"""
from __future__ import annotations

import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from datasets.distributed import split_dataset_by_node
from PIL import Image

from timm_spot.data import decode_image, holdout_split, load_image_source

from .config import AugmentConfig, DataConfig, PretrainConfig

# tags that separate the random streams derived from one (seed, stage, step, rank)
TAG_DATA, TAG_MASK, TAG_HISTORY, TAG_NOISE, TAG_TORCH, TAG_PERM, TAG_INIT, TAG_FIGURE, TAG_SHORTCUT = range(1, 10)

_MAX_CONSECUTIVE_UNREADABLE = 1000


class DataError(ValueError):
    """The data source cannot feed the run (no readable image, wrong column, ...); the message names it."""


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (numpy SeedSequence hashing: independent streams for different tuples)."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def torch_generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


def numpy_rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]))


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing (docs/method.md, "Preprocessing"; the authors' Preprocessor.py)
# ----------------------------------------------------------------------------------------------------------------

def _to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [0, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def _resize(x: torch.Tensor, size: int, mode: str, antialias: bool) -> torch.Tensor:
    out = F.interpolate(x[None], size=(size, size), mode=mode, align_corners=False,
                        antialias=antialias and (x.shape[1] > size or x.shape[2] > size))[0]
    return out.clamp_(0.0, 1.0)  # bicubic overshoots


def crop_params(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area fraction in ``scale`` and aspect (w/h) in ``ratio``.

    Like TF's ``sample_distorted_bounding_box`` / torchvision's RandomResizedCrop: up to 10 attempts, then (as
    torchvision) the largest central crop whose aspect ratio is within ``ratio`` (TF would take the whole image,
    whatever its aspect ratio).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _adjust_saturation(x: torch.Tensor, factor: float) -> torch.Tensor:
    """HSV saturation x factor (as tf.image.adjust_saturation): keeps hue and value, scales S, clips S to [0, 1].

    In HSV, every channel is ``V - (V - c)``, with ``V - c`` proportional to S at fixed hue, so scaling S by
    ``s_new / s`` scales ``V - c`` by the same ratio.
    """
    v = x.max(dim=0, keepdim=True).values
    mn = x.min(dim=0, keepdim=True).values
    s = torch.where(v > 0, (v - mn) / v.clamp_min(1e-12), torch.zeros_like(v))
    s_new = (s * factor).clamp(0.0, 1.0)
    ratio = torch.where(s > 0, s_new / s.clamp_min(1e-12), torch.ones_like(s))
    return v - (v - x) * ratio


def color_jitter(x: torch.Tensor, rng: np.random.Generator, bright_max_delta: float = 32. / 255.,
                 sat_range: Tuple[float, float] = (0.5, 1.5)) -> torch.Tensor:
    """Random brightness and saturation in random order (Preprocessor.color_and_scale)."""
    brightness_first = rng.random() > 0.5
    delta = float(rng.uniform(-bright_max_delta, bright_max_delta))
    factor = float(rng.uniform(sat_range[0], sat_range[1]))
    if brightness_first:
        x = _adjust_saturation((x + delta).clamp(0.0, 1.0), factor)
    else:
        x = (_adjust_saturation(x, factor) + delta)
    return x


def train_transform(image: Image.Image, aug: AugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """Random resized crop, bilinear/bicubic resize, h-flip, optional colour jitter -> [3, S, S] in [-1, 1].

    Small images (CIFAR's 32 px) are upsampled to ``img_size`` by the resize.
    """
    size = aug.img_size
    top, left, h, w = crop_params(image.height, image.width, aug.crop_scale, aug.crop_ratio, rng)
    x = _to_tensor(image.crop((left, top, left + w, top + h)))  # only the crop becomes float (uint8 crop: exact)
    coin = rng.random()
    mode = aug.interpolation if aug.interpolation != 'random' else ('bilinear' if coin > 0.5 else 'bicubic')
    x = _resize(x, size, mode, aug.antialias)
    if aug.hflip and rng.random() < 0.5:
        x = x.flip(-1)
    if aug.color_jitter:
        x = color_jitter(x, rng)
    return (x * 2.0 - 1.0).clamp_(-1.0, 1.0)


def figure_crop(image: Image.Image, size: int, central_fraction: float = 0.85) -> torch.Tensor:
    """Central crop of 85 % of each side, bilinear resize to ``size`` -> [3, S, S] in [-1, 1] (figures)."""
    x = _to_tensor(image)
    h, w = x.shape[1], x.shape[2]
    ch, cw = max(1, int(round(h * central_fraction))), max(1, int(round(w * central_fraction)))
    top, left = (h - ch) // 2, (w - cw) // 2
    x = _resize(x[:, top:top + ch, left:left + cw], size, 'bilinear', True)
    return x * 2.0 - 1.0


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------

def open_source(data: DataConfig):
    """The configured ``datasets`` (Iterable)Dataset with an encoded image column (errors name a missing column)."""
    source = None if data.data in (None, 'builtin') else data.data
    per_class = data.holdout_per_class
    ds = load_image_source(source, split=data.split, streaming=data.streaming, image_column=data.image_column,
                           label_column=data.holdout_label_column if per_class else None)
    if per_class:
        if data.streaming:
            raise ValueError('holdout_per_class needs a map-style dataset (streaming: false)')
        train_idx, _ = holdout_split(ds[data.holdout_label_column], per_class=per_class)
        ds = ds.select(train_idx)
    return ds


def dataset_length(ds, data: DataConfig) -> Optional[int]:
    """Images per epoch: len() of a map-style dataset, else ``dataset_size`` or the split info (streaming)."""
    if data.dataset_size:
        return data.dataset_size
    try:
        return len(ds)
    except TypeError:
        pass
    info = getattr(ds, 'info', None)
    splits = getattr(info, 'splits', None) or {}
    split = splits.get(data.split) if hasattr(splits, 'get') else None
    if split is not None and getattr(split, 'num_examples', None):
        return int(split.num_examples)
    return None


class MapStyleBatches(torch.utils.data.Dataset):
    """Item ``step`` = this process's batch at that step: ``(images [B,3,S,S], skipped, dataset indices [B])``.

    Epoch ``e`` is a permutation of the dataset seeded by (seed, stage, e), cut into ``n // (B * world)`` global
    batches (drop-last); process ``r`` takes slice ``[r * B, (r + 1) * B)`` of each. With fewer than ``B * world``
    images the permutations are concatenated instead. An unreadable image is replaced by the next readable one in
    dataset order and counted in ``skipped``.
    """

    def __init__(self, ds, cfg: PretrainConfig, stage: int, rank: int, world: int, num_steps: int) -> None:
        self.column = cfg.data.image_column
        self.ds = ds.select_columns([self.column]) if hasattr(ds, 'select_columns') else ds
        self.source = cfg.data.data
        self.augment = cfg.augment
        self.seed = cfg.run.seed
        self.batch_size = cfg.schedule.batch_size
        self.stage, self.rank, self.world = stage, rank, world
        self.num_steps = num_steps
        self.n = len(ds)
        if self.n == 0:
            raise DataError(f"data source {self.source!r} holds no images")
        self._perm_epoch: Optional[int] = None
        self._perm: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self.num_steps

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = numpy_rng(self.seed, self.stage, epoch, TAG_PERM).permutation(self.n)
            self._perm_epoch = epoch
        return self._perm

    def sample_index(self, step: int, j: int) -> int:
        global_batch = self.batch_size * self.world
        offset = self.rank * self.batch_size + j
        if self.n >= global_batch:
            # drop-last epochs: an epoch is n // global_batch steps, so a step never spans two permutations and
            # processes never see the same image in a step
            steps_per_epoch = self.n // global_batch
            epoch, within = divmod(step, steps_per_epoch)
            return int(self.permutation(epoch)[within * global_batch + offset])
        # fewer images than a global batch (tiny demo data): one continuous stream of permutations
        epoch, pos = divmod(step * global_batch + offset, self.n)
        return int(self.permutation(epoch)[pos])

    def __getitem__(self, step: int):
        images, indices, unreadable = [], [], []
        for j in range(self.batch_size):
            idx = self.sample_index(step, j)
            image, tries = None, 0
            while True:
                image = decode_image(self.ds[idx][self.column])
                if image is not None:
                    break
                if idx not in unreadable:
                    unreadable.append(idx)
                tries += 1
                if tries >= min(self.n, _MAX_CONSECUTIVE_UNREADABLE):
                    raise DataError(f'data source {self.source!r}: {tries} consecutive unreadable images in column '
                                    f'{self.column!r} (from row {idx}); is it the image column, are the files images?')
                idx = (idx + 1) % self.n
            rng = numpy_rng(self.seed, self.stage, step, self.rank, j, TAG_DATA)
            images.append(train_transform(image, self.augment, rng))
            indices.append(idx)
        # unreadable: the rows (not the retries) that could not be decoded in this batch; the trainer counts
        # each row once per run and names it once
        return torch.stack(images), unreadable, torch.tensor(indices, dtype=torch.long)


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def map_style_loader(batches: MapStyleBatches, start_step: int, num_workers: int) -> Iterator:
    """Batches ``start_step .. len-1`` in order. Workers only decode: every draw is seeded by the step."""
    if start_step >= len(batches):
        return iter(())
    loader = torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        sampler=range(start_step, len(batches)),
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=2 if num_workers else None,
        generator=torch.Generator().manual_seed(0),  # keeps the global RNG untouched by the loader
        persistent_workers=False,
    )
    return iter(loader)


class StreamPosition:
    """(epoch, examples consumed in it) of this process's shard of a streaming dataset (checkpointed)."""

    def __init__(self) -> None:
        self.epoch, self.offset = 0, 0

    def state_dict(self) -> Dict[str, int]:
        return {'epoch': self.epoch, 'offset': self.offset}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.epoch, self.offset = int(state['epoch']), int(state['offset'])


class StreamingBatches:
    """Batches from an ``IterableDataset`` shard: raw examples read in a background thread, decoded and augmented
    in a thread pool (``num_workers`` threads). Yields ``(images, skipped, indices, (epoch, offset))`` where indices
    are -1 (streams have no row ids) and (epoch, offset) is the position after the batch."""

    def __init__(self, ds, cfg: PretrainConfig, stage: int, rank: int, world: int, num_steps: int,
                 position: StreamPosition) -> None:
        self.augment = cfg.augment
        self.column = cfg.data.image_column
        self.seed, self.stage, self.rank = cfg.run.seed, stage, rank
        self.batch_size = cfg.schedule.batch_size
        self.num_steps = num_steps
        self.num_workers = max(1, cfg.data.num_workers)
        shard = split_dataset_by_node(ds, rank=rank, world_size=world) if world > 1 else ds
        self.ds = shard.shuffle(seed=derive_seed(self.seed, stage) % (2 ** 32), buffer_size=cfg.data.shuffle_buffer)
        self.position = position

    def _examples(self, epoch: int, offset: int) -> Iterator[Tuple[int, int, Any]]:
        """(epoch, offset after this example, image cell) forever, epoch after epoch."""
        while True:
            ds = self.ds.skip(offset) if offset else self.ds
            ds.set_epoch(epoch)
            got = False
            for row in ds:
                got = True
                offset += 1
                yield epoch, offset, row[self.column]
            if not got and offset == 0:
                raise RuntimeError('the streaming data source yielded no examples for this process')
            epoch, offset = epoch + 1, 0

    def iterate(self, start_step: int) -> Iterator:
        def work(args):
            step, j, cell = args
            image = decode_image(cell)
            if image is None:
                return None
            return train_transform(image, self.augment, numpy_rng(self.seed, self.stage, step, self.rank, j, TAG_DATA))

        out: 'queue.Queue' = queue.Queue(maxsize=2)
        stop = threading.Event()

        def producer():
            try:
                examples = self._examples(self.position.epoch, self.position.offset)
                with ThreadPoolExecutor(self.num_workers) as pool:
                    for step in range(start_step, self.num_steps):
                        images: List[torch.Tensor] = []
                        skipped: List[int] = []  # -1 per unreadable example (streams have no row ids)
                        pos = (self.position.epoch, self.position.offset)
                        while len(images) < self.batch_size:
                            need = self.batch_size - len(images)
                            cells = []
                            for _ in range(need):
                                e, o, cell = next(examples)
                                cells.append(cell)
                                pos = (e, o)
                            base = len(images)
                            results = list(pool.map(work, [(step, base + i, c) for i, c in enumerate(cells)]))
                            for r in results:
                                if r is None:
                                    skipped.append(-1)
                                else:
                                    images.append(r)
                        while not stop.is_set():
                            try:
                                out.put((torch.stack(images), skipped,
                                         torch.full((self.batch_size,), -1, dtype=torch.long), pos), timeout=0.5)
                                break
                            except queue.Full:
                                continue
                        if stop.is_set():
                            return
                out.put(None)
            except BaseException as e:  # surface errors in the consumer
                out.put(e)

        thread = threading.Thread(target=producer, daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()


def figure_images(ds, cfg: PretrainConfig, count: int) -> torch.Tensor:
    """``count`` readable images spread over the dataset (streams: the first ones), test preprocessing.

    Also the run's first check of its data: a source without a single readable image fails here, before the
    output directory is touched.
    """
    size = cfg.augment.img_size
    column = cfg.data.image_column
    out: List[torch.Tensor] = []
    tried = 0
    try:
        n = len(ds)
    except TypeError:
        n = None
    if n:
        candidates = list(np.linspace(0, n - 1, num=min(n, count * 2), dtype=np.int64))
        seen = set()
        for idx in candidates:
            if len(out) >= count:
                break
            if int(idx) in seen:
                continue
            seen.add(int(idx))
            tried += 1
            image = decode_image(ds[int(idx)][column])
            if image is not None:
                out.append(figure_crop(image, size))
    else:
        for i, row in enumerate(ds):
            if len(out) >= count or i > count * 4:
                break
            tried += 1
            image = decode_image(row[column])
            if image is not None:
                out.append(figure_crop(image, size))
    if not out:
        raise DataError(f'data source {cfg.data.data!r} has no readable image: none of the {tried} rows tried in column '
                        f'{column!r} decodes; check --image-column and that the files are images PIL can read')
    return torch.stack(out)

"""Device-resident training data: the images decoded once into one uint8 tensor on the device, batches cut from it
by batched torch ops on that device (random resized crop, bilinear/bicubic resize, h-flip, colour jitter), with no
host synchronisation per step.

Same images per step as the CPU pipeline: step ``s`` of process ``r`` takes the same dataset rows as
:class:`~train_scripts.batches.MapStyleBatches` (epoch ``e`` is the permutation seeded by ``(seed, stage, e)``, cut
into drop-last global batches, process ``r`` taking slice ``r``). The augmentation has the same distribution as
:func:`~train_scripts.batches.train_transform` but draws from a device ``torch.Generator`` seeded by
``(seed, stage, step, rank)`` instead of numpy per sample, so the draws differ. Where the result differs beyond
the random stream:

* the resize samples the crop's box in the whole image (``grid_sample``, coordinates clamped to the crop box):
  bilinear equals ``F.interpolate`` of the cropped tensor; bicubic may read up to two pixels beyond the crop edge
  where ``F.interpolate`` repeats the edge pixel;
* no antialiasing when a crop is downscaled (``grid_sample`` has none): CIFAR-10 at 32 px is only upsampled; for
  larger stored images keep ``img_size`` near the stored size or store images at about the training size.

Memory: CIFAR-10 (50,000 x 32 x 32 x 3) is 150 MB; every image must have the same size (store larger photos
resized first).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from timm_spot.data import decode_image

from .batches import TAG_DATA, TAG_PERM, DataError, _adjust_saturation, derive_seed, numpy_rng
from .config import AugmentConfig


def device_generator(device: torch.device, *parts: int) -> torch.Generator:
    """A generator on ``device`` seeded by ``parts`` (host work only: no synchronisation)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


def _uniform(shape, low, high, g: torch.Generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g, device=device)


def crop_boxes(batch: int, height, width, scale: Sequence[float], ratio: Sequence[float], g: torch.Generator, device,
               attempts: int = 10) -> torch.Tensor:
    """``[B, 4]`` float (top, left, h, w) of random resized crops, drawn in one batch: the rule of
    :func:`~train_scripts.batches.crop_params` (area fraction in ``scale``, aspect w/h log-uniform in ``ratio``,
    the first of ``attempts`` draws that fits, else the largest central crop within ``ratio``). ``height`` /
    ``width``: ints (one image size) or ``[B]`` tensors (each image's own size, e.g. JPEGs decoded on the device)."""
    height = torch.as_tensor(height, dtype=torch.float32, device=device).expand(batch)
    width = torch.as_tensor(width, dtype=torch.float32, device=device).expand(batch)
    area = (height * width)[:, None]
    target = area * _uniform((batch, attempts), scale[0], scale[1], g, device)
    aspect = torch.exp(_uniform((batch, attempts), math.log(ratio[0]), math.log(ratio[1]), g, device))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = torch.argmax(fits.int(), dim=1, keepdim=True)  # first fitting attempt (0 when none fits)
    any_fit = fits.any(dim=1)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    u = torch.rand((batch, 2), generator=g, device=device)
    top = torch.floor(u[:, 0] * (height - h + 1)).clamp(min=0).minimum(height - 1)
    left = torch.floor(u[:, 1] * (width - w + 1)).clamp(min=0).minimum(width - 1)
    # no draw fits: the largest central crop whose aspect ratio is within ``ratio``
    in_ratio = width / height
    fw = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fh = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    fallback = torch.stack([torch.div(height - fh, 2, rounding_mode='floor'),
                            torch.div(width - fw, 2, rounding_mode='floor'), fh, fw], dim=1)
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(any_fit[:, None], boxes, fallback)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Float images ``[B, 3, H, W]`` in [0, 1], boxes ``[B, 4]`` (top, left, h, w) -> ``[B, 3, size, size]``:
    each box resized as ``F.interpolate(crop, size, mode, align_corners=False)`` would (pixel centres mapped
    linearly, coordinates clamped to the box), clamped to [0, 1]."""
    b, _, height, width = images.shape
    top, left, h, w = boxes.unbind(1)
    i = torch.arange(size, device=images.device, dtype=torch.float32) + 0.5
    ys = (top[:, None] + (i[None] * h[:, None] / size - 0.5).clamp(min=0).minimum(h[:, None] - 1))  # [B, S]
    xs = (left[:, None] + (i[None] * w[:, None] / size - 0.5).clamp(min=0).minimum(w[:, None] - 1))
    gy = (2 * ys + 1) / height - 1
    gx = (2 * xs + 1) / width - 1
    grid = torch.stack([gx[:, None, :].expand(b, size, size), gy[:, :, None].expand(b, size, size)], dim=-1)
    out = F.grid_sample(images, grid, mode=mode, padding_mode='border', align_corners=False)
    return out.clamp_(0.0, 1.0)


def batched_color_jitter(x: torch.Tensor, g: torch.Generator, bright_max_delta: float = 32. / 255.,
                         sat_range=(0.5, 1.5)) -> torch.Tensor:
    """:func:`~train_scripts.batches.color_jitter` for a batch ``[B, 3, H, W]``: per image, brightness +-32/255 and
    saturation x[0.5, 1.5] in random order (the saturation equation is the CPU pipeline's own)."""
    b = x.shape[0]
    coins = torch.rand((b, 3), generator=g, device=x.device)
    brightness_first = (coins[:, 0] > 0.5).view(b, 1, 1, 1)
    delta = (-bright_max_delta + 2 * bright_max_delta * coins[:, 1]).view(b, 1, 1, 1)
    factor = (sat_range[0] + (sat_range[1] - sat_range[0]) * coins[:, 2]).view(b, 1, 1)

    def saturate(t: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] as [3, B, H, W]: the channel max is over dim 0
        return _adjust_saturation(t.transpose(0, 1), factor).transpose(0, 1)
    first = saturate((x + delta).clamp(0.0, 1.0))
    second = saturate(x) + delta
    return torch.where(brightness_first, first, second)


def augment_batch(images: torch.Tensor, aug: AugmentConfig, g: torch.Generator,
                  sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` on the device -> float ``[B, 3, S, S]`` in [-1, 1]: random resized crop,
    bilinear/bicubic resize (``interpolation: random`` picks per image), h-flip, colour jitter, as
    :func:`~train_scripts.batches.train_transform` (module docstring: where it differs). ``sizes``: ``[B, 2]``
    (height, width) of each image where the batch is padded (:func:`decode_jpegs`): crops stay inside them."""
    b, _, height, width = images.shape
    dev = images.device
    x = images.float().div_(255.0)
    if sizes is not None:
        height, width = sizes[:, 0], sizes[:, 1]
    boxes = crop_boxes(b, height, width, aug.crop_scale, aug.crop_ratio, g, dev)
    coin = torch.rand((b, 2), generator=g, device=dev)
    if aug.interpolation == 'random':
        bilinear = (coin[:, 0] > 0.5).view(b, 1, 1, 1)
        out = torch.where(bilinear, resized_crops(x, boxes, aug.img_size, 'bilinear'),
                          resized_crops(x, boxes, aug.img_size, 'bicubic'))
    else:
        out = resized_crops(x, boxes, aug.img_size, aug.interpolation)
    if aug.hflip:
        out = torch.where((coin[:, 1] < 0.5).view(b, 1, 1, 1), out.flip(-1), out)
    if aug.color_jitter:
        out = batched_color_jitter(out, g)
    return (out * 2.0 - 1.0).clamp_(-1.0, 1.0)


def decode_jpegs(encoded: Sequence[bytes], device) -> tuple:
    """JPEG bytes -> (uint8 ``[B, 3, Hmax, Wmax]`` zero-padded at the bottom and right, ``[B, 2]`` (height, width)),
    decoded by ``torchvision.io.decode_jpeg`` on ``device`` (nvJPEG on CUDA, libjpeg on the CPU), RGB."""
    from torchvision.io import ImageReadMode, decode_jpeg
    if not encoded:
        raise DataError('no images to decode')
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in encoded]
    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    h = max(int(i.shape[1]) for i in images)
    w = max(int(i.shape[2]) for i in images)
    out = torch.zeros((len(images), 3, h, w), dtype=torch.uint8, device=device)
    for k, image in enumerate(images):
        out[k, :, :image.shape[1], :image.shape[2]] = image
    sizes = torch.tensor([[i.shape[1], i.shape[2]] for i in images], dtype=torch.float32).to(device)
    return out, sizes


def _as_uint8_nchw(images: torch.Tensor) -> torch.Tensor:
    if images.dtype != torch.uint8:
        raise ValueError(f'device images must be uint8, got {images.dtype}')
    if images.dim() != 4:
        raise ValueError(f'device images must be [N, H, W, 3] or [N, 3, H, W], got shape {list(images.shape)}')
    if images.shape[0] == 0:
        raise DataError('the image source holds no images: nothing to keep on the device')
    if images.shape[-1] == 3 and images.shape[1] != 3:
        images = images.permute(0, 3, 1, 2)
    if images.shape[1] != 3:
        raise ValueError(f'device images must have 3 channels (RGB), got shape {list(images.shape)}')
    return images.contiguous()


class DeviceImages:
    """A whole image source as uint8 ``[N, 3, H, W]`` on ``device``, and this process's augmented batch per step.

    ``batch(step)`` is a pure function of ``(seed, stage, step, rank)``: the rows are MapStyleBatches' rows, the
    augmentation draws come from a device generator seeded by the step. The per-epoch permutation is copied to the
    device once per epoch (the only host-to-device copy)."""

    def __init__(self, images: torch.Tensor, aug: AugmentConfig, batch_size: int, device, seed: int = 0,
                 stage: int = 2, rank: int = 0, world: int = 1) -> None:
        self.images = _as_uint8_nchw(images).to(device)
        self.aug, self.batch_size, self.device = aug, int(batch_size), torch.device(device)
        self.seed, self.stage, self.rank, self.world = seed, stage, rank, world
        self.n = self.images.shape[0]
        if self.n < batch_size * world:
            raise DataError(f'{self.n} images on the device cannot fill a global batch of {batch_size * world} '
                            f'(batch_size x processes); use the CPU pipeline or a smaller batch')
        self._epoch: Optional[int] = None
        self._perm: Optional[torch.Tensor] = None

    @classmethod
    def from_dataset(cls, ds, column: str, aug: AugmentConfig, batch_size: int, device, limit: Optional[int] = None,
                     **kwargs) -> 'DeviceImages':
        """Decode every image of a map-style ``datasets`` source (same size each: CIFAR-10) into one uint8 tensor."""
        n = len(ds) if limit is None else min(limit, len(ds))
        if n == 0:
            raise DataError('the image source holds no images: nothing to keep on the device')
        arrays = []
        for i in range(n):
            image = decode_image(ds[i][column])
            if image is None:
                raise DataError(f'row {i} of the image source does not decode; device-resident data needs every '
                                f'image readable (use the CPU pipeline, which skips unreadable images)')
            array = np.asarray(image.convert('RGB'), dtype=np.uint8)
            if arrays and array.shape != arrays[0].shape:
                raise DataError(f'device-resident data needs images of one size: row 0 is {arrays[0].shape[:2]}, '
                                f'row {i} is {array.shape[:2]}; resize the source first')
            arrays.append(array)
        return cls(torch.from_numpy(np.stack(arrays)), aug, batch_size, device, **kwargs)

    def rows(self, step: int) -> torch.Tensor:
        """Dataset rows of this process at ``step`` (``[B]`` long, on the device), as MapStyleBatches.sample_index."""
        global_batch = self.batch_size * self.world
        epoch, within = divmod(step, self.n // global_batch)
        if self._epoch != epoch:
            perm = numpy_rng(self.seed, self.stage, epoch, TAG_PERM).permutation(self.n)
            self._perm, self._epoch = torch.from_numpy(perm).to(self.device), epoch
        start = within * global_batch + self.rank * self.batch_size
        return self._perm[start:start + self.batch_size]

    def batch(self, step: int) -> torch.Tensor:
        """This process's augmented batch ``[B, 3, S, S]`` in [-1, 1] at ``step``."""
        g = device_generator(self.device, self.seed, self.stage, step, self.rank, TAG_DATA)
        return augment_batch(self.images.index_select(0, self.rows(step)), self.aug, g)

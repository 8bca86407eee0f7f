"""Device-resident data (train_scripts/device_data.py), on the CPU: determinism, shapes, the crop / flip semantics
against the CPU pipeline's own operations, and the errors of bad sources."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train_scripts.batches import DataError, MapStyleBatches, _adjust_saturation
from train_scripts.config import AugmentConfig, resolve
from train_scripts.device_data import (DeviceImages, augment_batch, batched_color_jitter, crop_boxes,
                                       device_generator, resized_crops)

CIFAR = os.path.join(os.environ.get('TIMM_SPOT_DATA', os.path.join(os.path.dirname(__file__), '..', '..', 'shared',
                                                                   'data')), 'cifar10', 'train.parquet')


def _images(n=12, h=32, w=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)


def _aug(**kw):
    return dataclasses.replace(AugmentConfig(), **{'img_size': 32, **kw})


def test_batches_are_deterministic_and_in_range():
    data = DeviceImages(_images(), _aug(), batch_size=4, device='cpu', seed=3)
    a, b = data.batch(5), data.batch(5)
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, data.batch(6))
    assert a.min() >= -1 and a.max() <= 1
    other_seed = DeviceImages(_images(), _aug(), batch_size=4, device='cpu', seed=4)
    assert not torch.equal(a, other_seed.batch(5))


def test_rows_are_the_cpu_pipelines_rows():
    cfg = resolve(dict(batch_size=4, seed=7, img_size=32))
    n, world = 40, 2
    for rank in range(world):
        data = DeviceImages(_images(n), cfg.augment, 4, 'cpu', seed=7, stage=2, rank=rank, world=world)
        ref = MapStyleBatches(list(range(n)), cfg, stage=2, rank=rank, world=world, num_steps=20)
        for step in (0, 1, 4, 5, 11):  # 5 steps per epoch: crosses epochs
            assert data.rows(step).tolist() == [ref.sample_index(step, j) for j in range(4)]


def test_crop_boxes_fit_the_image_and_follow_the_scale():
    g = device_generator(torch.device('cpu'), 0)
    boxes = crop_boxes(2000, 30, 50, (0.2, 0.6), (0.75, 1.33), g, 'cpu')
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 30).all() and (left + w <= 50).all()
    area = h * w / (30 * 50)
    assert area.min() > 0.15 and area.max() < 0.65
    assert ((w / h) > 0.7).all() and ((w / h) < 1.45).all()
    assert len(set(top.tolist())) > 5 and len(set(left.tolist())) > 5
    # no attempt can fit: the largest central crop within the ratio range (as crop_params)
    tall = crop_boxes(4, 100, 10, (0.9, 1.0), (0.75, 1.33), g, 'cpu')
    assert tall[0].tolist() == [(100 - 13) // 2, 0, 13, 10]


@pytest.mark.parametrize('box', [(0, 0, 32, 40), (3, 5, 17, 9), (10, 0, 22, 31)])
def test_bilinear_resized_crop_equals_interpolate_of_the_crop(box):
    x = _images(1).permute(0, 3, 1, 2).float() / 255
    top, left, h, w = box
    ref = F.interpolate(x[:, :, top:top + h, left:left + w], size=(24, 24), mode='bilinear', align_corners=False)
    out = resized_crops(x, torch.tensor([box], dtype=torch.float32), 24, 'bilinear')
    torch.testing.assert_close(out, ref.clamp(0, 1), rtol=0, atol=1e-5)  # a half-pixel shift is ~1e-1


def test_identity_crop_returns_the_image_and_flips_really_flip():
    images = _images(8, 32, 32)
    aug = _aug(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], interpolation='bilinear', color_jitter=False)
    out = augment_batch(images.permute(0, 3, 1, 2), aug, device_generator(torch.device('cpu'), 1))
    ref = images.permute(0, 3, 1, 2).float() / 255 * 2 - 1
    flipped = [bool(torch.allclose(o, r.flip(-1), atol=1e-5)) for o, r in zip(out, ref)]
    same = [bool(torch.allclose(o, r, atol=1e-5)) for o, r in zip(out, ref)]
    assert all(f != s for f, s in zip(flipped, same))  # each image is exactly the original or its mirror
    assert 0 < sum(flipped) < 8
    no_flip = augment_batch(images.permute(0, 3, 1, 2), dataclasses.replace(aug, hflip=False),
                            device_generator(torch.device('cpu'), 1))
    torch.testing.assert_close(no_flip, ref, atol=1e-5, rtol=0)


def test_batched_jitter_uses_the_cpu_saturation_per_image():
    x = torch.rand(6, 3, 8, 8)
    out = batched_color_jitter(x, device_generator(torch.device('cpu'), 2))
    coins = torch.rand((6, 3), generator=device_generator(torch.device('cpu'), 2))
    for i in range(6):
        delta = -32 / 255 + 2 * 32 / 255 * float(coins[i, 1])
        factor = 0.5 + float(coins[i, 2])
        if coins[i, 0] > 0.5:
            ref = _adjust_saturation((x[i] + delta).clamp(0, 1), factor)
        else:
            ref = _adjust_saturation(x[i], factor) + delta
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=0)


def test_bad_sources_are_refused_with_a_reason():
    with pytest.raises(ValueError, match='3 channels'):
        DeviceImages(torch.zeros(4, 8, 8, 4, dtype=torch.uint8), _aug(), 2, 'cpu')
    with pytest.raises(ValueError, match='uint8'):
        DeviceImages(torch.zeros(4, 8, 8, 3), _aug(), 2, 'cpu')
    with pytest.raises(DataError, match='no images'):
        DeviceImages(torch.zeros(0, 8, 8, 3, dtype=torch.uint8), _aug(), 2, 'cpu')
    with pytest.raises(DataError, match='global batch'):
        DeviceImages(_images(5), _aug(), 4, 'cpu', world=2)
    with pytest.raises(DataError, match='no images'):
        DeviceImages.from_dataset([], 'image', _aug(), 2, 'cpu')


def test_from_dataset_decodes_cifar10_rows():
    if not os.path.isfile(CIFAR):
        pytest.skip(f'CIFAR-10 parquet not found at {CIFAR} (set TIMM_SPOT_DATA)')
    import datasets
    ds = datasets.load_dataset('parquet', data_files=CIFAR, split='train')
    data = DeviceImages.from_dataset(ds, 'image', _aug(img_size=64), 8, 'cpu', limit=64)
    assert data.images.shape == (64, 3, 32, 32) and data.images.dtype == torch.uint8
    first = np.array(ds[0]['image'].convert('RGB'))
    assert torch.equal(data.images[0], torch.from_numpy(first).permute(2, 0, 1))
    assert data.batch(0).shape == (8, 3, 64, 64)


def test_crops_of_padded_images_stay_inside_each_image():
    # two images of one value, different sizes, zero-padded into one batch: a crop reading the padding would be darker
    images = torch.zeros(2, 3, 40, 60, dtype=torch.uint8)
    images[0, :, :40, :30] = 200
    images[1, :, :20, :60] = 200
    sizes = torch.tensor([[40., 30.], [20., 60.]])
    aug = _aug(interpolation='bilinear', color_jitter=False, crop_scale=[0.05, 1.0])
    for seed in range(20):
        out = augment_batch(images, aug, device_generator(torch.device('cpu'), seed), sizes=sizes)
        torch.testing.assert_close(out, torch.full_like(out, 200 / 255 * 2 - 1), atol=1e-5, rtol=0)
    boxes = crop_boxes(2, sizes[:, 0], sizes[:, 1], (0.05, 1.0), (0.75, 1.33), device_generator(torch.device('cpu'), 0),
                       'cpu')
    assert (boxes[:, 0] + boxes[:, 2] <= sizes[:, 0]).all() and (boxes[:, 1] + boxes[:, 3] <= sizes[:, 1]).all()


def test_decode_jpegs_matches_pil_and_pads():
    import io
    from PIL import Image
    from train_scripts.device_data import decode_jpegs
    rng = np.random.default_rng(0)
    encoded, arrays = [], []
    for h, w in ((20, 30), (32, 16)):
        array = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format='JPEG', quality=95)
        encoded.append(buf.getvalue())
        arrays.append(np.array(Image.open(io.BytesIO(buf.getvalue())).convert('RGB')))
    images, sizes = decode_jpegs(encoded, 'cpu')
    assert images.shape == (2, 3, 32, 30) and sizes.tolist() == [[20, 30], [32, 16]]
    for k, ref in enumerate(arrays):
        h, w = ref.shape[:2]
        got = images[k, :, :h, :w].permute(1, 2, 0).numpy().astype(np.int16)
        assert np.abs(got - ref).mean() < 2.0  # two JPEG decoders, IDCT rounding
        assert images[k, :, h:, :].sum() == 0 and images[k, :, :, w:].sum() == 0
    with pytest.raises(DataError, match='no images'):
        decode_jpegs([], 'cpu')

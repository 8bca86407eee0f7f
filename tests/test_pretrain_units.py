"""Unit tests of the pretraining pipeline (train_scripts): losses, LR schedule, history buffer, config and ablation
presets, data pipeline (determinism, sharding, unreadable images, missing columns), atomic writes, checkpoints."""
import io
import json
import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import timm_spot  # noqa: F401
from train_scripts import config as C
from train_scripts import losses as L
from train_scripts import optim as O
from train_scripts.checkpoint import (atomic_save_safetensors, atomic_write, atomic_write_text, clean_partial,
                                      list_checkpoints, read_latest)
from train_scripts.batches import (MapStyleBatches, StreamingBatches, StreamPosition, crop_params, figure_crop,
                                   open_source, train_transform)
from train_scripts.gan import DCGANGenerator
from train_scripts.history import HistoryBuffer
from train_scripts.optim import learning_rate
from train_scripts.modes import preserved_batchnorm_stats

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Small CPU ops run fastest (and least disturbed by other jobs) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ losses
def test_reconstruction_loss_is_30_times_mse():
    y = torch.tensor([[0.5, -0.5], [1.0, 0.0]]).reshape(1, 1, 2, 2)
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0]]).reshape(1, 1, 2, 2)
    # mean of squares = (0.25 + 0.25 + 1 + 0) / 4 = 0.375
    assert L.reconstruction_loss(y, x, 30.0).item() == pytest.approx(30 * 0.375)


def test_weight_decay_is_half_sum_of_squares():
    p1, p2 = torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])
    assert L.weight_decay_loss([p1, p2], 5e-5).item() == pytest.approx(5e-5 * 0.5 * (1 + 4 + 9))
    assert L.weight_decay_loss([], 5e-5).item() == 0.0


def _bce(logit, target):
    p = 1 / (1 + math.exp(-logit))
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def test_discriminator_class_loss_hand_computed_and_sign():
    real, corrupt = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    expected = (_bce(2.0, 1) + _bce(-1.0, 1) + _bce(0.5, 0) + _bce(-3.0, 0)) / 4  # mean over [real; corrupt]
    assert L.discriminator_class_loss(real, corrupt).item() == pytest.approx(expected, rel=1e-6)
    # sign: the loss falls when real logits rise and corrupt logits fall
    r, c = real.clone().requires_grad_(), corrupt.clone().requires_grad_()
    L.discriminator_class_loss(r, c).backward()
    assert (r.grad < 0).all() and (c.grad > 0).all()


def test_mask_loss_targets_kept_cells_and_all_ones_for_real():
    real_logits = torch.tensor([[[[1.0, -1.0], [0.0, 2.0]]]])
    corrupt_logits = torch.tensor([[[[3.0, -2.0], [0.5, -0.5]]]])
    omega = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # 1 = kept
    expected = np.mean([_bce(1.0, 1), _bce(-1.0, 1), _bce(0.0, 1), _bce(2.0, 1),
                        _bce(3.0, 1), _bce(-2.0, 0), _bce(0.5, 0), _bce(-0.5, 1)])
    assert L.mask_loss(real_logits, corrupt_logits, omega).item() == pytest.approx(expected, rel=1e-6)


def test_generator_adversarial_loss_is_non_saturating():
    logits = torch.tensor([-2.0, 0.0, 4.0], requires_grad=True)
    loss = L.generator_adversarial_loss(logits)
    expected = np.mean([math.log1p(math.exp(2.0)), math.log(2.0), math.log1p(math.exp(-4.0))])
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert (logits.grad < 0).all()  # R gains by making C call x_hat real
    # non-saturating: strong gradient where C confidently spots the fake (sigmoid(-2) ~ 0.12)
    assert abs(logits.grad[0].item()) * 3 == pytest.approx(1 - 1 / (1 + math.exp(2.0)), rel=1e-5)


def test_kept_cells_l2_only_counts_kept_cells():
    x = torch.zeros(1, 3, 4, 4)
    x_hat = torch.zeros(1, 3, 4, 4)
    x_hat[:, :, :2, :2] = 1.0   # cell (0, 0): kept, error 1
    x_hat[:, :, 2:, 2:] = 5.0   # cell (1, 1): dropped, must not count
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    # kept pixels x channels = 3 cells * 4 px * 3 ch = 36; sum of squared errors = 4 px * 3 ch * 1 = 12
    assert L.kept_cells_l2_loss(x_hat, x, mask).item() == pytest.approx(12 / 36)
    assert L.kept_cells_l2_loss(x_hat, x, torch.zeros_like(mask)).item() == 0.0


def test_accuracies():
    acc = L.discriminator_accuracies(torch.tensor([1.0, -1.0]), torch.tensor([-1.0, -2.0]))
    assert acc['acc_real'].item() == 0.5 and acc['acc_corrupt'].item() == 1.0
    m = L.mask_accuracies(torch.ones(1, 1, 2, 2), torch.tensor([[[[1.0, -1.0], [1.0, -1.0]]]]),
                          torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]))
    assert m['mask_acc'].item() == 0.75 and m['mask_acc_real'].item() == 1.0
    assert m['mask_recall_dropped'].item() == pytest.approx(2 / 3)


def test_decayed_parameters_cover_conv_linear_not_batchnorm():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    names = {id(p) for p in O.decayed_parameters(net)}
    assert names == {id(net[0].weight), id(net[0].bias), id(net[3].weight), id(net[3].bias)}
    assert {id(p) for p in O.decayed_parameters(net, include_biases=False)} == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in O.bias_parameters(net)} == {id(net[0].bias), id(net[3].bias)}
    net[0].bias.grad = torch.ones(4)
    O.scale_gradients(O.bias_parameters(net), 2.0)
    assert torch.equal(net[0].bias.grad, torch.full((4,), 2.0))


def test_lr_schedules():
    cfg = C.resolve({}).optim
    assert learning_rate(0, 1000, cfg) == pytest.approx(3e-4)
    assert learning_rate(500, 1000, cfg) == pytest.approx((3e-4 + 3e-6) / 2)
    assert learning_rate(1000, 1000, cfg) == pytest.approx(3e-6)
    cfg.lr_schedule = 'code'
    assert learning_rate(0, 1000, cfg) == pytest.approx(3e-4)
    assert learning_rate(450, 1000, cfg) == pytest.approx((3e-4 + 3e-6) / 2)
    assert learning_rate(900, 1000, cfg) == pytest.approx(3e-6)
    assert learning_rate(999, 1000, cfg) == pytest.approx(3e-6)
    cfg.lr_schedule = 'constant'
    assert learning_rate(999, 1000, cfg) == 3e-4


def test_preserved_batchnorm_stats_keeps_running_stats_and_gradients():
    bn = nn.BatchNorm2d(3)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    with preserved_batchnorm_stats(bn):
        y = bn(x)
    y.pow(2).sum().backward()  # autograd still works after the swap back
    assert x.grad is not None
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    bn(x)
    assert not torch.equal(bn.running_mean, before['running_mean'])


# ------------------------------------------------------------------------------------------------ history
def test_history_buffer_mixes_half_and_masks_travel_with_images():
    buf = HistoryBuffer(capacity=6, fraction=0.5)
    g = torch.Generator().manual_seed(0)

    def batch(value):  # image i of a batch filled with value + i, its mask with the same number
        imgs = torch.stack([torch.full((3, 4, 4), value + i) for i in range(4)])
        masks = torch.stack([torch.full((1, 2, 2), value + i) for i in range(4)])
        return imgs, masks

    imgs, masks = batch(0.0)
    out, out_m, from_h = buf.mix(imgs, masks, g)  # empty buffer: everything current, buffer filled
    assert not from_h.any() and torch.equal(out, imgs) and buf.size == 4
    imgs, masks = batch(100.0)
    out, out_m, from_h = buf.mix(imgs, masks, g)
    assert from_h.sum().item() == 2  # half of the batch from the history
    for i in range(4):
        v = out[i, 0, 0, 0].item()
        assert (out[i] == v).all() and (out_m[i] == v).all()  # each mask travels with its image
        assert (v < 100) == bool(from_h[i])  # history images are the old ones, others the current ones
        if not from_h[i]:
            assert v == 100.0 + i  # current images keep their positions
    assert buf.size == 6  # filled up to capacity with current images
    stored = set(buf.images[:, 0, 0, 0].tolist())
    assert stored == {0.0, 1.0, 2.0, 3.0, 100.0, 101.0}
    imgs, masks = batch(200.0)
    buf.mix(imgs, masks, g)  # full: 2 random slots refreshed with current images
    stored = buf.images[:, 0, 0, 0].tolist()
    assert sum(v >= 200 for v in stored) == 2
    assert torch.equal(buf.masks[:, 0, 0, 0], buf.images[:, 0, 0, 0])
    # state round trip
    clone = HistoryBuffer(capacity=6)
    clone.load_state_dict(buf.state_dict())
    assert clone.size == 6 and torch.equal(clone.images, buf.images) and torch.equal(clone.masks, buf.masks)


def test_history_disabled_is_identity():
    buf = HistoryBuffer(capacity=10, enabled=False)
    imgs, masks = torch.randn(4, 3, 2, 2), torch.ones(4, 1, 1, 1)
    out, out_m, from_h = buf.mix(imgs, masks, torch.Generator())
    assert out is imgs and out_m is masks and not from_h.any() and buf.size == 0


# ------------------------------------------------------------------------------------------------ config
def test_ablation_presets_map_to_model_and_loss_switches():
    base = C.resolve({})
    assert base.method.theta == 0.7 and base.method.history and base.method.real_source == 'autoencoded'
    expect = {
        'baseline': {'theta': 0.5}, 'a': {'real_source': 'input'}, 'b': {'repair': 'local'}, 'c': {'theta': 0.1},
        'd': {'theta': 0.3}, 'e': {'theta': 0.7}, 'f': {'theta': 0.9}, 'g': {'mask_loss_weight': 0.0},
        'h': {'encoder_kernel_size': 3}, 'i': {'gate': False}, 'j': {'history': False}, 'k': {'repair': 'none'},
        'l': {'generator': 'gan', 'mask_loss_weight': 0.0},
    }
    for name, keys in expect.items():
        cfg = C.resolve({'ablation': name}).to_flat()
        for k, v in keys.items():
            assert cfg[k] == v, (name, k)
        if name not in ('c', 'd', 'e', 'f'):
            assert cfg['theta'] == 0.5, name
    assert C.resolve({'ablation': 'h'}).generator_kwargs()['encoder_kernel_size'] == 3
    assert C.resolve({'ablation': 'i'}).generator_kwargs()['gate'] is False
    assert C.resolve({'ablation': 'b'}).generator_kwargs()['repair'] == 'local'
    assert C.resolve({'ablation': 'g'}).discriminator_kwargs()['mask_head'] is False
    assert C.resolve({'img_size': 96}).discriminator_kwargs()['head_kernel_size'] == 6
    # explicit keys win over the preset
    assert C.resolve({'ablation': 'c', 'theta': 0.2}).method.theta == 0.2


def test_config_errors_name_the_key():
    with pytest.raises(C.ConfigError, match='thetta'):
        C.resolve({'thetta': 0.5})
    with pytest.raises(C.ConfigError, match='img_size'):
        C.resolve({'img_size': 100})
    with pytest.raises(C.ConfigError, match='ablation'):
        C.resolve({'ablation': 'z'})
    assert C.parse_overrides(['gen_widths=[8,16,32,64]', 'history=false', 'data=a/b.parquet']) == \
        {'gen_widths': [8, 16, 32, 64], 'history': False, 'data': 'a/b.parquet'}


def test_shipped_configs_resolve():
    for name in ('demo', 'imagenet', 'stl10', 'cifar10_64'):
        cfg = C.resolve(C.load_yaml(str(REPO / 'train_scripts' / 'configs' / f'{name}.yaml')))
        assert cfg.augment.img_size % 16 == 0
    assert C.resolve(C.load_yaml(str(REPO / 'train_scripts' / 'configs' / 'imagenet.yaml'))).augment.img_size == 128


def test_cli_parsing_flags_and_set():
    from train_scripts.pretrain import config_from_args

    cfg, _ = config_from_args(['--img-size', '48', '--set', 'theta=0.3', 'history=false', '--stage', '1',
                               '--ablation', 'b'])
    assert cfg.augment.img_size == 48 and cfg.method.theta == 0.3 and cfg.method.history is False
    assert cfg.schedule.stage == '1' and cfg.method.repair == 'local' and cfg.data.data == 'builtin'  # demo.yaml is the default base


# ------------------------------------------------------------------------------------------------ data
def _png_bytes(color, size=(40, 30)):
    buf = io.BytesIO()
    Image.new('RGB', size, color).save(buf, format='PNG')
    return buf.getvalue()


def _small_cfg(**kw):
    base = dict(img_size=32, batch_size=2, gen_widths=[8, 16, 32, 64], gen_stem_width=8)
    base.update(kw)
    return C.resolve(base)


def test_train_transform_range_shape_and_determinism():
    cfg = _small_cfg(img_size=64)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))  # CIFAR-sized
    a = train_transform(image, cfg.augment, np.random.default_rng(5))
    b = train_transform(image, cfg.augment, np.random.default_rng(5))
    assert a.shape == (3, 64, 64) and a.min() >= -1 and a.max() <= 1  # 32-px image upsampled to 64
    assert torch.equal(a, b)
    t = figure_crop(image, 64)
    assert t.shape == (3, 64, 64)
    rng = np.random.default_rng(1)
    for _ in range(50):
        top, left, h, w = crop_params(100, 200, (0.333, 1.0), (0.75, 1.33), rng)
        assert h * w <= 20000 and 0.74 <= w / h <= 1.34
        assert h * w >= 0.33 * 20000 * 0.98 or (h, w) == (100, 133)  # else the central-crop fallback
        assert top + h <= 100 and left + w <= 200


def test_batches_are_deterministic_and_disjoint_across_processes():
    import datasets
    feats = datasets.Features({'image': datasets.Image(decode=False)})
    ds = datasets.Dataset.from_dict({'image': [{'bytes': _png_bytes((i * 20, 0, 0)), 'path': None}
                                               for i in range(10)]}, features=feats)
    cfg = _small_cfg()
    r0 = MapStyleBatches(ds, cfg, stage=1, rank=0, world=2, num_steps=10)
    r1 = MapStyleBatches(ds, cfg, stage=1, rank=1, world=2, num_steps=10)
    for step in range(6):
        i0, i1 = r0[step][2].tolist(), r1[step][2].tolist()
        assert not set(i0) & set(i1), step
    seen = sorted(r0[0][2].tolist() + r1[0][2].tolist() + r0[1][2].tolist() + r1[1][2].tolist())
    assert len(set(seen)) == 8  # an epoch (10 // 4 = 2 steps) never repeats an image
    a, b = r0[3], MapStyleBatches(ds, cfg, stage=1, rank=0, world=2, num_steps=10)[3]
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])  # a pure function of (step, rank)


def test_unreadable_image_in_parquet_is_skipped_and_counted(tmp_path):
    import datasets
    rows = [{'bytes': _png_bytes((0, 200, 0)), 'path': None} for _ in range(4)]
    rows[2] = {'bytes': b'not an image at all', 'path': None}
    feats = datasets.Features({'image': datasets.Image(decode=False)})
    path = tmp_path / 'bad.parquet'
    datasets.Dataset.from_dict({'image': rows}, features=feats).to_parquet(str(path))
    cfg = _small_cfg(data=str(path), batch_size=4)
    ds = open_source(cfg.data)
    batches = MapStyleBatches(ds, cfg, stage=1, rank=0, world=1, num_steps=1)
    images, skipped, indices = batches[0]
    assert skipped == [2] and 2 not in indices.tolist() and images.shape == (4, 3, 32, 32)  # the row, once
    assert torch.isfinite(images).all()


def test_unreadable_image_in_folder_is_skipped_and_counted(tmp_path):
    for i in range(3):
        Image.new('RGB', (20, 20), (i * 50, 0, 0)).save(tmp_path / f'ok{i}.png')
    (tmp_path / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    cfg = _small_cfg(data=str(tmp_path), batch_size=4)
    ds = open_source(cfg.data)
    assert len(ds) == 4
    images, skipped, indices = MapStyleBatches(ds, cfg, stage=1, rank=0, world=1, num_steps=1)[0]
    assert len(skipped) == 1 and images.shape[0] == 4


def test_missing_image_column_error_names_it(tmp_path):
    import datasets
    path = tmp_path / 'x.parquet'
    datasets.Dataset.from_dict({'picture': [_png_bytes((1, 2, 3))]}).to_parquet(str(path))
    with pytest.raises(ValueError, match="'image'"):
        open_source(_small_cfg(data=str(path)).data)


def test_streaming_batches_resume_from_position():
    """Streaming (IterableDataset) path: the (epoch, offset) position restores the exact continuation."""
    import datasets
    feats = datasets.Features({'image': datasets.Image(decode=False)})
    ds = datasets.Dataset.from_dict({'image': [{'bytes': _png_bytes((i * 30, i, 0)), 'path': None}
                                               for i in range(6)]}, features=feats).to_iterable_dataset(num_shards=2)
    cfg = _small_cfg(streaming=True, batch_size=2, num_workers=1, shuffle_buffer=4)
    pos = StreamPosition()
    full = list(StreamingBatches(ds, cfg, 1, 0, 1, 5, pos).iterate(0))
    assert len(full) == 5  # crosses the 6-image epoch boundary
    resume_pos = StreamPosition()
    resume_pos.epoch, resume_pos.offset = full[1][3]
    resumed = list(StreamingBatches(ds, cfg, 1, 0, 1, 5, resume_pos).iterate(2))
    assert len(resumed) == 3
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a[0], b[0]) and a[3] == b[3]


# ------------------------------------------------------------------------------------------------ files
def test_atomic_write_keeps_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / 'w.safetensors'
    atomic_save_safetensors({'a': torch.ones(3)}, str(target))
    old = target.read_bytes()

    def crashing_writer(tmp):
        with open(tmp, 'wb') as f:
            f.write(b'partial')
        raise KeyboardInterrupt('simulated crash')

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(target), crashing_writer)
    assert target.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ['w.safetensors']  # temp file cleaned up


@pytest.mark.slow
def test_atomic_write_survives_sigkill_mid_write(tmp_path):
    target = tmp_path / 'config.yaml'
    atomic_write_text(str(target), 'old: 1\n')
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from train_scripts.checkpoint import atomic_write
        def writer(tmp):
            with open(tmp, 'w') as f:
                f.write('new: ')
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        atomic_write({str(target)!r}, writer)
    """)
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_text() == 'old: 1\n'


def test_checkpoint_pointer_ignores_partial_saves(tmp_path):
    root = tmp_path / 'checkpoints'
    for name in ('stage1_step0000002', 'stage1_step0000004'):
        (root / name).mkdir(parents=True)
        (root / name / 'meta.json').write_text('{}')
    atomic_write_text(str(root / 'latest'), json.dumps({'name': 'stage1_step0000002'}))
    (root / '.tmp-stage1_step0000006').mkdir()  # a save killed before its rename
    (root / 'stage1_step0000008').mkdir()  # no meta.json: incomplete
    assert read_latest(str(root)) == str(root / 'stage1_step0000002')
    assert [s for s, _, _ in list_checkpoints(str(root))] == [1, 1]
    (root / 'latest').unlink()
    assert read_latest(str(root)) == str(root / 'stage1_step0000004')
    clean_partial(str(root))
    assert not (root / '.tmp-stage1_step0000006').exists()


# ------------------------------------------------------------------------------------------------ models
def test_dcgan_generator_shape():
    gan = DCGANGenerator(img_size=48, latent_dim=16, width=8)
    out = gan(gan.sample_noise(3, torch.Generator().manual_seed(0)))
    assert out.shape == (3, 3, 48, 48) and out.abs().max() <= 1


@pytest.mark.slow
def test_discriminator_learns_real_vs_corrupt_above_chance():
    """Tiny overfit: C (real/corrupt + mask heads, the recipe's losses and Adam settings) separates images from
    copies whose 16x16 cells were replaced by flat averages, and locates the damaged cells."""
    import timm
    from timm_spot.data import builtin_sample_images, decode_image

    torch.manual_seed(0)
    ds = builtin_sample_images()
    real = torch.stack([figure_crop(decode_image(ds[i]['image']), 32) for i in range(8)])
    g = torch.Generator().manual_seed(1)
    omega = (torch.rand(8, 1, 2, 2, generator=g) >= 0.5).float()
    omega[:, :, 0, 0] = 0  # at least one damaged cell per image
    cell_mean = F.interpolate(F.avg_pool2d(real, 16), scale_factor=16, mode='nearest')
    m = F.interpolate(omega, scale_factor=16, mode='nearest')
    corrupt = m * real + (1 - m) * cell_mean
    disc = timm.create_model('alexnet_spot_discriminator', head_kernel_size=2, head_hidden_size=256)
    opt = torch.optim.Adam(disc.parameters(), lr=3e-4, betas=(0.5, 0.999), eps=1e-5)
    disc.train()
    for _ in range(40):
        logits, mask_logits = disc.forward_pretext(torch.cat([real, corrupt]))
        loss = L.discriminator_class_loss(logits[:8], logits[8:]) + \
            0.1 * L.mask_loss(mask_logits[:8], mask_logits[8:], omega)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        logits, mask_logits = disc.forward_pretext(torch.cat([real, corrupt]))
    acc = L.discriminator_accuracies(logits[:8], logits[8:])
    accuracy = (acc['acc_real'] + acc['acc_corrupt']).item() / 2
    assert accuracy > 0.8, acc
    assert L.mask_accuracies(mask_logits[:8], mask_logits[8:], omega)['mask_acc'].item() > 0.6


def test_stage1_autoencoder_loads_into_an_ablation_generator():
    """Ablations b/i/k reuse one stage-1 autoencoder: E and D load, the different repair network is left alone."""
    import timm
    import timm_spot  # noqa: F401
    from train_scripts.networks import load_stage1_weights

    kw = dict(stem_width=8, widths=(8, 8, 8, 8))
    stage1 = timm.create_model('damage_repair_generator', **kw)
    no_repair = timm.create_model('damage_repair_generator', repair='none', **kw)
    note = load_stage1_weights(no_repair, stage1.state_dict())
    assert 'autoencoder' in note
    for k, v in no_repair.state_dict().items():
        assert torch.equal(v, stage1.state_dict()[k]), k
    other_encoder = timm.create_model('damage_repair_generator', stem_width=4, widths=(8, 8, 8, 8))
    with pytest.raises(RuntimeError):
        load_stage1_weights(other_encoder, stage1.state_dict())


def test_holdout_rows_are_left_out_of_pretraining(tmp_path):
    """holdout_per_class drops the probe validation rows (last n of each class) before any training."""
    import datasets
    labels = [0, 1, 2] * 4  # rows 9, 10, 11 are the last of each class
    rows = [{'bytes': _png_bytes((i * 20, 0, 0)), 'path': f'row{i}.png'} for i in range(12)]
    feats = datasets.Features({'image': datasets.Image(decode=False), 'label': datasets.Value('int64')})
    path = tmp_path / 'labelled.parquet'
    datasets.Dataset.from_dict({'image': rows, 'label': labels}, features=feats).to_parquet(str(path))
    ds = open_source(_small_cfg(data=str(path), holdout_per_class=1).data)
    assert len(ds) == 9
    assert sorted(r['path'] for r in ds['image']) == sorted(f'row{i}.png' for i in range(9))
    with pytest.raises(ValueError, match="label column 'class' not found"):
        open_source(_small_cfg(data=str(path), holdout_per_class=1, holdout_label_column='class').data)


def test_typed_config_round_trips_and_every_key_has_one_section():
    """Flat keys (files, --set) <-> the typed sections: each key lives in exactly one section, a config rebuilt from
    its flat form is equal, and values come back typed (a YAML-quoted number is a float, stage 2 is '2')."""
    import dataclasses

    seen = [f.name for _, section in C.SECTIONS for f in dataclasses.fields(section)]
    assert len(seen) == len(set(seen)) == len(C.DEFAULTS)
    cfg = C.resolve({'lr': '1e-3', 'stage': 2, 'gen_widths': [8, 16, 32, 64], 'resume': True, 'ablation': 'j'})
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.schedule.stage == '2' and cfg.stages == [2]
    assert cfg.run.resume == 'latest' and cfg.method.history is False and cfg.method.theta == 0.5
    assert C.PretrainConfig.from_flat(cfg.to_flat()) == cfg
    assert cfg.replace(theta=0.3).method.theta == 0.3 and cfg.method.theta == 0.5  # a copy, validated
    with pytest.raises(C.ConfigError, match='theta'):
        cfg.replace(theta=2.0)
    assert C.resolve({'generator': 'gan', 'real_source': 'input'}).needs_autoencoder is False
    assert C.resolve({'img_size': 96}).grid == (6, 6)
    text = C.format_keys_help()
    assert all(f'  {k} (default' in text for k in C.DEFAULTS)


def test_generator_sets_the_modes_of_each_pretraining_stage():
    """Stage 1 trains E, D, to_rgb; stage 2 freezes them (no gradients, BatchNorm in eval) and trains R."""
    import timm
    import timm_spot  # noqa: F401

    gen = timm.create_model('damage_repair_generator', stem_width=8, widths=(8, 8, 8, 8))
    ae = {id(p) for p in gen.autoencoder_parameters()}
    gen.set_pretraining_stage(1)
    assert all(p.requires_grad == (id(p) in ae) for p in gen.parameters())
    assert all(m.training for m in gen.modules())
    gen.set_pretraining_stage(2)
    assert all(p.requires_grad == (id(p) not in ae) for p in gen.parameters())
    assert not any(m.training for part in (gen.encoder, gen.decoder, gen.to_rgb) for m in part.modules())
    assert all(m.training for m in gen.repair.modules())
    with pytest.raises(ValueError, match='stage'):
        gen.set_pretraining_stage(3)


def _rss_after_freeing_64mb(retain: bool) -> tuple:
    """(resident MB holding a 64 MB tensor, resident MB after freeing it), in a fresh process."""
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, '.')
        from train_scripts.allocator import retain_freed_memory
        import torch
        def rss():
            return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) / 1024
        assert retain_freed_memory({retain}) is True
        a = torch.ones(64 * 2 ** 20 // 4)
        held = rss()
        del a
        print(held, rss())
    """)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    return tuple(float(v) for v in out.stdout.split())


@pytest.mark.slow
def test_retain_freed_memory_keeps_freed_blocks_and_restores_glibc_defaults():
    """With the setting, a freed 64 MB tensor stays resident (the next step reuses it without page faults); with
    glibc's defaults restored, it is unmapped at once."""
    from train_scripts.allocator import retain_freed_memory
    if not sys.platform.startswith('linux'):
        assert retain_freed_memory() is False
        return
    held, after = _rss_after_freeing_64mb(retain=True)
    assert after > held - 8, (held, after)
    held, after = _rss_after_freeing_64mb(retain=False)
    assert after < held - 56, (held, after)


def test_trainer_keeps_parameters_contiguous_with_channels_last_images(tmp_path):
    """Channels-last is for activations: parameters stay contiguous (fused Adam would copy every channels-last
    parameter and its states back and forth each step), and the networks still produce channels-last maps."""
    from train_scripts.trainer import Pretrainer
    cfg = C.resolve(dict(data='builtin', img_size=32, batch_size=2, output_dir=str(tmp_path), threads=1,
                         progress=False, num_workers=0, cpu=True, mixed_precision='no', channels_last=True,
                         gen_widths=[8, 16, 32, 64]))
    trainer = Pretrainer(cfg)
    disc = trainer.create_discriminator()
    assert all(p.is_contiguous() for p in disc.parameters())
    x = trainer.memory_format(torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        assert disc.forward_features(x).is_contiguous(memory_format=torch.channels_last)

"""Tests of the damage & repair generator (``timm_spot/models/damage_repair_generator.py``).

Small widths and 32-64 px inputs keep the file fast on CPU. Behaviour is checked with values: receptive fields,
exact gating, the average fill, mask statistics, ablations and the timm model API.
"""
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm
import timm_spot.models.damage_repair_generator  # noqa: F401  (registers the model with timm)
from timm_spot.models.damage_repair_generator import DamageRepairGenerator, RepairBlock

MODEL = 'damage_repair_generator'
SMALL = dict(stem_width=4, widths=(8, 8, 16, 16))  # k = 4 like the paper, narrow layers


def _small(**kwargs) -> DamageRepairGenerator:
    torch.manual_seed(0)
    cfg = dict(SMALL)
    cfg.update(kwargs)
    return timm.create_model(MODEL, **cfg)


def _images(b: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN running stats / affine params so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(123)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


# ------------------------------------------------------------------------------------------------------------------
# Encoder receptive field
# ------------------------------------------------------------------------------------------------------------------

def _patch_mask(size: int, i: int, j: int, lo_off: int, hi_off: int) -> torch.Tensor:
    """Boolean [size, size] map of the pixels [16i + lo_off, 16i + hi_off] x [16j + lo_off, 16j + hi_off]."""
    inside = torch.zeros(size, size, dtype=torch.bool)
    r0, r1 = max(16 * i + lo_off, 0), min(16 * i + hi_off, size - 1)
    c0, c1 = max(16 * j + lo_off, 0), min(16 * j + hi_off, size - 1)
    inside[r0:r1 + 1, c0:c1 + 1] = True
    return inside


@torch.no_grad()
def test_receptive_field_is_18x18_with_2x2_encoder_convs():
    model = _small().eval()
    _randomize_bn(model)
    x = _images(2, 64)
    phi = model.encode(x)
    assert phi.shape == (2, 16, 4, 4)
    for i, j in [(1, 1), (0, 0), (3, 2)]:
        inside = _patch_mask(64, i, j, -1, 16)  # [16i - 1, 16i + 16]: 18 px, clipped to the image
        x2 = torch.where(inside, x, torch.randn_like(x) * 3)
        phi2 = model.encode(x2)
        assert torch.equal(phi2[:, :, i, j], phi[:, :, i, j]), f'cell ({i},{j}) sees pixels outside its 18x18 patch'
        assert not torch.equal(phi2, phi)  # other cells did change
        # every corner of the (clipped) patch reaches the cell
        rows = [max(16 * i - 1, 0), min(16 * i + 16, 63)]
        cols = [max(16 * j - 1, 0), min(16 * j + 16, 63)]
        for r in rows:
            for c in cols:
                x3 = x.clone()
                x3[:, :, r, c] += 2.
                assert not torch.equal(model.encode(x3)[:, :, i, j], phi[:, :, i, j]), f'pixel ({r},{c}) not seen'


@torch.no_grad()
def test_receptive_field_is_33x33_with_3x3_encoder_convs():
    model = _small(encoder_kernel_size=3).eval()
    _randomize_bn(model)
    x = _images(1, 64)
    phi = model.encode(x)
    assert phi.shape == (1, 16, 4, 4)
    i = j = 1
    # TF 'SAME' for 3x3/2 on even sizes pads 0 before and 1 after: the patch is [16i - 1, 16i + 31] (33 px)
    inside = _patch_mask(64, i, j, -1, 31)
    x2 = torch.where(inside, x, torch.randn_like(x) * 3)
    assert torch.equal(model.encode(x2)[:, :, i, j], phi[:, :, i, j])
    # a pixel 10 px beyond the 18x18 patch of the 2x2 design still reaches the cell
    x3 = x.clone()
    x3[:, :, 16 * i + 16 + 10, 16 * j + 16 + 10] += 2.
    assert not torch.equal(model.encode(x3)[:, :, i, j], phi[:, :, i, j])
    # ... but not with the paper's 2x2 convs
    model2 = _small().eval()
    assert torch.equal(model2.encode(x3)[:, :, i, j], model2.encode(x)[:, :, i, j])


# ------------------------------------------------------------------------------------------------------------------
# Mask, damage and repair
# ------------------------------------------------------------------------------------------------------------------

def test_sample_mask_statistics_shape_and_reproducibility():
    model = _small()
    g = torch.Generator().manual_seed(0)
    mask = model.sample_mask(20, (32, 32), theta=0.7, generator=g)
    assert mask.shape == (20, 1, 32, 32) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0., 1.}
    dropped = 1. - mask.mean().item()  # 20480 cells
    assert abs(dropped - 0.7) < 0.02
    # default theta is the model's, a generator makes draws reproducible
    assert model.theta == 0.7
    m1 = model.sample_mask(4, 8, generator=torch.Generator().manual_seed(5))
    m2 = model.sample_mask(4, 8, generator=torch.Generator().manual_seed(5))
    m3 = model.sample_mask(4, 8, generator=torch.Generator().manual_seed(6))
    assert m1.shape == (4, 1, 8, 8) and torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert model.sample_mask(2, 4, theta=0.).eq(1).all()
    assert model.sample_mask(2, 4, theta=1.).eq(0).all()
    half = model.sample_mask(20, (32, 32), theta=0.5, generator=torch.Generator().manual_seed(1))
    assert abs(1. - half.mean().item() - 0.5) < 0.02
    with pytest.raises(ValueError, match='theta'):
        model.sample_mask(2, 4, theta=1.5)


def test_damage_avg_fill_matches_hand_computation():
    model = _small()
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(2, 5, 4, 6, generator=g)
    mask = model.sample_mask(2, (4, 6), theta=0.5, generator=g)
    assert 0 < mask.sum() < mask.numel()
    phi_hat = model.damage(phi, mask)
    expected = phi.clone()
    for b in range(2):
        for r in range(4):
            for c in range(6):
                if mask[b, 0, r, c] == 0:
                    # 'SAME' 3x3 average over the neighbours inside the grid (padding is not counted)
                    win = phi[b, :, max(r - 1, 0):r + 2, max(c - 1, 0):c + 2]
                    expected[b, :, r, c] = win.mean(dim=(1, 2))
    kept = mask.bool().expand_as(phi)
    assert torch.equal(phi_hat[kept], phi[kept])  # kept cells untouched, bit for bit
    torch.testing.assert_close(phi_hat, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(phi_hat[~kept], phi[~kept])


def test_damage_noise_fill_changes_dropped_cells_only():
    model = _small(fill='noise')
    phi = torch.zeros(2, 64, 16, 16)
    mask = model.sample_mask(2, 16, theta=0.5, generator=torch.Generator().manual_seed(0))
    out1 = model.damage(phi, mask, generator=torch.Generator().manual_seed(1))
    out2 = model.damage(phi, mask, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out1, out2)
    kept = mask.bool().expand_as(phi)
    assert torch.equal(out1[kept], phi[kept])
    noise = out1[~kept]
    assert (noise != 0).all()
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1.) < 0.05  # standard normal
    # the average fill of a constant feature is the constant itself: dropped cells unchanged
    assert torch.equal(_small().damage(phi, mask), phi)


def test_mask_shape_is_validated():
    model = _small().eval()
    phi = model.encode(_images(2, 32))
    with pytest.raises(ValueError, match='mask'):
        model.damage(phi, torch.ones(2, 1, 3, 2))
    with pytest.raises(ValueError, match='mask'):
        model.repair_decode(phi, torch.ones(2, 2, 2, 2))


def test_repair_block_gate_passes_kept_entries_exactly():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 8, 8)
    mask = (torch.rand(3, 1, 8, 8) > 0.5).float()
    for preact in (False, True):
        block = RepairBlock(6, preact=preact, gate=True).eval()
        _randomize_bn(block)
        out = block(x, mask)
        kept = mask.bool().expand_as(x)
        assert torch.equal(out[kept], x[kept])
        assert not torch.allclose(out[~kept], x[~kept])
    assert isinstance(RepairBlock(6, preact=False).pre, nn.Identity)
    assert isinstance(RepairBlock(6, preact=True).pre[0], nn.BatchNorm2d)
    # ablation (i), no gating: kept entries change too
    block = RepairBlock(6, gate=False).eval()
    out = block(x, mask)
    kept = mask.bool().expand_as(x)
    assert not torch.allclose(out[kept], x[kept])
    # the mask is an input channel of the first conv
    assert block.conv1.in_channels == 7


@torch.no_grad()
def test_repair_decode_gates_and_upsamples_mask_per_block():
    model = _small().eval()
    _randomize_bn(model)
    assert len(model.repair) == 5
    assert [b.conv2.out_channels for b in model.repair] == [16, 16, 8, 8, 4]  # phi, then after each resize-conv
    assert isinstance(model.repair[0].pre, nn.Identity)
    assert all(isinstance(b.pre, nn.Sequential) for b in model.repair[1:])
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append((args[0], args[1], out))) for b in model.repair]
    x = _images(2, 64)
    phi = model.encode(x)
    mask = model.sample_mask(2, (4, 4), theta=0.5, generator=torch.Generator().manual_seed(3))
    phi_hat = model.damage(phi, mask)
    x_hat = model.repair_decode(phi_hat, mask)
    for h in hooks:
        h.remove()
    assert x_hat.shape == x.shape and x_hat.abs().max() <= 1.
    assert len(seen) == 5
    for level, (inp, m, out) in enumerate(seen):
        scale = 2 ** level
        assert inp.shape[-1] == 4 * scale
        # nearest-neighbour upsampled mask at every decoder resolution
        assert torch.equal(m, mask.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3))
        kept = m.bool().expand_as(inp)
        assert torch.equal(out[kept], inp[kept])  # gated: kept entries pass unchanged
        assert not torch.allclose(out[~kept], inp[~kept])
    assert torch.equal(seen[0][0], phi_hat)  # the first block acts on phi_hat directly
    # repaired != plain decoding of the damaged feature
    assert not torch.allclose(x_hat, model.decode(phi_hat))


@torch.no_grad()
def test_nothing_dropped_equals_autoencoder():
    for repair in ('distributed', 'local', 'none'):
        model = _small(repair=repair).eval()
        _randomize_bn(model)
        x = _images(2, 64)
        phi = model.encode(x)
        mask = model.sample_mask(2, (4, 4), theta=0.)
        assert mask.eq(1).all()
        assert torch.equal(model.damage(phi, mask), phi)
        assert torch.equal(model.repair_decode(model.damage(phi, mask), mask), model.decode(phi))
        x_hat, m = model.damage_and_repair(x, mask=mask)
        assert torch.equal(x_hat, model.autoencode(x)) and m is not None


@torch.no_grad()
def test_damage_and_repair_samples_a_mask():
    model = _small(theta=0.5).eval()
    x = _images(2, 64)
    g = torch.Generator().manual_seed(0)
    x_hat, mask = model.damage_and_repair(x, generator=g)
    assert x_hat.shape == x.shape and mask.shape == (2, 1, 4, 4)
    x_hat2, mask2 = model.damage_and_repair(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, mask2) and torch.equal(x_hat, x_hat2)
    expected = model.repair_decode(model.damage(model.encode(x), mask), mask)
    assert torch.equal(x_hat, expected)


# ------------------------------------------------------------------------------------------------------------------
# Ablations
# ------------------------------------------------------------------------------------------------------------------

def _param_shapes(model: nn.Module) -> dict:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def test_ablation_no_repair_network():
    model = _small(repair='none').eval()
    assert len(model.repair) == 0 and list(model.repair_parameters()) == []
    assert not any(n.startswith('repair') for n in _param_shapes(model))
    x = _images(2, 64)
    with torch.no_grad():
        phi = model.encode(x)
        mask = model.sample_mask(2, 4, theta=0.5, generator=torch.Generator().manual_seed(0))
        phi_hat = model.damage(phi, mask)
        assert torch.equal(model.repair_decode(phi_hat, mask), model.decode(phi_hat))
    base = _param_shapes(_small())
    assert _param_shapes(model) == {n: s for n, s in base.items() if not n.startswith('repair.')}


@torch.no_grad()
def test_ablation_local_repair():
    model = _small(repair='local').eval()
    _randomize_bn(model)
    assert len(model.repair) == 5
    assert all(b.conv2.out_channels == 16 for b in model.repair)  # all at phi's width
    base = _param_shapes(_small())
    local = _param_shapes(model)
    assert {n: s for n, s in local.items() if not n.startswith('repair.')} == \
        {n: s for n, s in base.items() if not n.startswith('repair.')}
    seen = []
    hooks = [b.register_forward_hook(lambda m, args, out: seen.append(args[1].shape[-1])) for b in model.repair]
    phi = model.encode(_images(2, 64))
    mask = model.sample_mask(2, 4, theta=0.5, generator=torch.Generator().manual_seed(0))
    out = model.repair_decode(model.damage(phi, mask), mask)
    for h in hooks:
        h.remove()
    assert seen == [4] * 5 and out.shape == (2, 3, 64, 64)


@torch.no_grad()
def test_ablation_no_gating_changes_kept_cells():
    gated, ungated = _small().eval(), _small(gate=False).eval()
    ungated.load_state_dict(gated.state_dict())  # same parameters, only the gate differs
    captured = {}
    for name, model in (('gated', gated), ('ungated', ungated)):
        model.repair[0].register_forward_hook(lambda m, args, out, name=name: captured.__setitem__(name, (args, out)))
    phi = gated.encode(_images(2, 64))
    mask = gated.sample_mask(2, 4, theta=0.5, generator=torch.Generator().manual_seed(0))
    phi_hat = gated.damage(phi, mask)
    gated.repair_decode(phi_hat, mask)
    ungated.repair_decode(phi_hat, mask)
    kept = mask.bool().expand_as(phi)
    assert torch.equal(captured['gated'][1][kept], phi_hat[kept])
    assert not torch.allclose(captured['ungated'][1][kept], phi_hat[kept])
    # dropped cells get the same update with and without the gate
    torch.testing.assert_close(captured['gated'][1][~kept], captured['ungated'][1][~kept])


def test_ablation_3x3_encoder_changes_only_encoder_kernels():
    base, k3 = _param_shapes(_small()), _param_shapes(_small(encoder_kernel_size=3))
    assert base.keys() == k3.keys()
    changed = {n for n in base if base[n] != k3[n]}
    assert changed == {f'encoder.{i}.conv.weight' for i in range(1, 5)}
    for n in changed:
        assert base[n][-2:] == (2, 2) and k3[n][-2:] == (3, 3) and base[n][:2] == k3[n][:2]


def test_invalid_options_raise():
    for kwargs in (dict(fill='zeros'), dict(repair='global'), dict(theta=1.2)):
        with pytest.raises(ValueError):
            _small(**kwargs)


# ------------------------------------------------------------------------------------------------------------------
# timm API
# ------------------------------------------------------------------------------------------------------------------

def test_default_model_structure_and_cfg():
    model = timm.create_model(MODEL)
    assert isinstance(model, DamageRepairGenerator)
    cfg = model.pretrained_cfg
    from timm_spot.models._releases import find_release
    rel = find_release(MODEL, None)  # the default tag is the first release; without one, no weights are claimed
    assert cfg.get('hf_hub_id') == (rel.repo_id if rel else None)
    size = rel.img_size if rel else 128
    assert cfg['input_size'] == (3, size, size) and cfg['mean'] == (0.5, 0.5, 0.5) and cfg['std'] == (0.5, 0.5, 0.5)
    assert cfg['first_conv'] + '.weight' in model.state_dict()
    shapes = _param_shapes(model)
    assert shapes['encoder.0.conv.weight'] == (32, 3, 3, 3)
    assert [shapes[f'encoder.{i}.conv.weight'] for i in range(1, 5)] == \
        [(64, 32, 2, 2), (128, 64, 2, 2), (256, 128, 2, 2), (512, 256, 2, 2)]
    assert [shapes[f'decoder.{i}.conv.weight'][0] for i in range(4)] == [256, 128, 64, 32]
    assert shapes['to_rgb.weight'] == (3, 32, 3, 3) and 'to_rgb.bias' in shapes
    assert [shapes[f'repair.{i}.conv2.weight'][0] for i in range(5)] == [512, 256, 128, 64, 32]
    bn = model.encoder[1].bn
    assert bn.momentum == 0.025 and bn.eps == 1e-3
    assert model.encoder[1].bn.act.negative_slope == 0.1
    assert model.num_features == 3 and model.num_classes == 0
    assert model.feature_info == [
        dict(num_chs=32, reduction=1, module='encoder.0'), dict(num_chs=64, reduction=2, module='encoder.1'),
        dict(num_chs=128, reduction=4, module='encoder.2'), dict(num_chs=256, reduction=8, module='encoder.3'),
        dict(num_chs=512, reduction=16, module='encoder.4'),
    ]


def test_parameter_groups_partition_the_model():
    model = _small(num_classes=0)
    ae = {id(p) for p in model.autoencoder_parameters()}
    rep = {id(p) for p in model.repair_parameters()}
    assert ae and rep and not ae & rep
    assert ae | rep == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.repair.parameters()} == rep
    from timm.models import group_parameters
    groups = group_parameters(model, model.group_matcher(), reverse=True)
    assert len(set(groups.values())) > 1
    assert groups['encoder.0.conv.weight'] < groups['encoder.1.conv.weight'] < groups['decoder.0.conv.weight']


def test_forward_shapes_train_and_eval():
    model = _small()
    x = _images(2, 32)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 3, 32, 32) and feats.abs().max() <= 1.
        assert torch.equal(feats, model.autoencode(x))
        assert torch.equal(model.forward_features(x), feats)  # deterministic in eval mode
        out = model(x)
        assert out.shape == (2, 3)
        torch.testing.assert_close(out, feats.mean((2, 3)))
    model.train()
    torch.manual_seed(0)
    t1 = model.forward_features(x)
    t2 = model.forward_features(x)
    assert t1.shape == (2, 3, 32, 32)
    assert not torch.allclose(t1, t2)  # a fresh drop mask every call (like dropout)


@torch.no_grad()
def test_image_to_image_model_and_reset_classifier():
    model = _small(num_classes=0, global_pool='').eval()
    x = _images(2, 32)
    out = model(x)
    assert out.shape == (2, 3, 32, 32) and torch.equal(out, model.autoencode(x))
    model.reset_classifier(5, 'avg')
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 3)
    model = _small(num_classes=7)
    assert model(_images(2, 32)).shape == (2, 7)
    model.to(torch.float64)
    model.reset_classifier(4)
    assert model.get_classifier().weight.dtype == torch.float64


def test_unknown_kwarg_raises_type_error():
    with pytest.raises(TypeError):
        timm.create_model(MODEL, not_a_model_arg=1)


@torch.no_grad()
def test_features_only_and_forward_intermediates():
    x = _images(2, 64)
    feat_model = timm.create_model(MODEL, features_only=True, **SMALL).eval()
    assert feat_model.feature_info.channels() == [4, 8, 8, 16, 16]
    assert feat_model.feature_info.reduction() == [1, 2, 4, 8, 16]
    feats = feat_model(x)
    assert [tuple(f.shape) for f in feats] == [(2, 4, 64, 64), (2, 8, 32, 32), (2, 8, 16, 16), (2, 16, 8, 8),
                                              (2, 16, 4, 4)]
    model = _small().eval()
    # FeatureListNet flattens the encoder Sequential: encoder.0.conv.weight -> encoder_0.conv.weight
    feat_model.load_state_dict(
        {k.replace('encoder.', 'encoder_', 1): v for k, v in model.state_dict().items() if k.startswith('encoder.')})
    final, inter = model.forward_intermediates(x)
    assert torch.equal(final, model.forward_features(x))
    assert torch.equal(inter[-1], model.encode(x))
    for a, b in zip(inter, feat_model(x)):
        assert torch.equal(a, b)
    only = model.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert len(only) == 2 and torch.equal(only[0], inter[1]) and torch.equal(only[1], inter[3])
    final_early, _ = model.forward_intermediates(x, indices=[2], stop_early=True)
    assert torch.equal(final_early, inter[2])
    getter = timm.create_model(MODEL, features_only=True, feature_cls='getter', **SMALL).eval()
    assert [f.shape[1] for f in getter(x)] == [4, 8, 8, 16, 16]


@torch.no_grad()
def test_prune_intermediate_layers():
    x = _images(2, 64)
    model = _small().eval()
    taps = model.forward_intermediates(x, intermediates_only=True)
    pruned = _small().eval()
    assert pruned.prune_intermediate_layers([2]) == [2]
    assert len(pruned.encoder) == 3 and len(pruned.decoder) == 0 and len(pruned.repair) == 0
    assert pruned.num_features == pruned.head_hidden_size == 8 and pruned.num_classes == 0
    assert torch.equal(pruned.forward_features(x), taps[2])
    assert torch.equal(pruned(x), taps[2])  # head without pooling / classifier
    assert not any(n.startswith(('decoder', 'repair', 'to_rgb')) for n, _ in pruned.named_parameters())
    pruned.reset_classifier(3, 'avg')
    assert pruned(x).shape == (2, 3)
    # at the last tap the generator is kept when the head is kept
    keep = _small().eval()
    keep.prune_intermediate_layers([4], prune_head=False)
    assert torch.equal(keep(x), model(x))
    full = _small().eval()
    full.prune_intermediate_layers([4])
    assert torch.equal(full.forward_features(x), taps[4]) and full.num_features == 16


@torch.no_grad()
def test_torchscript_matches_eager():
    model = _small().eval()
    x = _images(1, 32)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(scripted.forward_features(x), model.forward_features(x), rtol=0, atol=0)
    with pytest.raises(Exception, match='not a multiple'):
        scripted(_images(1, 40))


def test_grad_checkpointing_same_output_and_grads():
    x = _images(2, 32)
    mask = torch.ones(2, 1, 2, 2)
    mask[0, 0, 0, 1] = 0
    mask[1, 0, 1, 0] = 0
    grads, outs = [], []
    for ckpt in (False, True):
        model = _small()
        model.set_grad_checkpointing(ckpt)
        model.eval()
        out, _ = model.damage_and_repair(x, mask=mask)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    assert grads[0].keys() == grads[1].keys() and any(k.startswith('repair.') for k in grads[0])
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k])


# ------------------------------------------------------------------------------------------------------------------
# Bad input and weight loading
# ------------------------------------------------------------------------------------------------------------------

def test_bad_input_size_and_channels():
    model = _small().eval()
    with pytest.raises(ValueError, match='100x96'):
        model(torch.randn(1, 3, 100, 96))
    with pytest.raises(ValueError, match='stride 16'):
        model.encode(torch.randn(1, 3, 32, 40))
    with pytest.raises(ValueError, match='channels'):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match='100x96'):
        model.forward_intermediates(torch.randn(1, 3, 100, 96))
    gray = _small(in_chans=1).eval()
    assert gray(torch.randn(1, 1, 32, 32)).shape == (1, 1)
    assert gray.forward_features(torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_local_safetensors_loading(tmp_path):
    from safetensors.torch import save_file
    model = _small()
    _randomize_bn(model)
    path = str(tmp_path / 'model.safetensors')
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    loaded = timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=path), **SMALL)
    sd = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # mismatched keys name the key
    bad = {k: v.contiguous() for k, v in sd.items()}
    bad['encoder.0.conv.weight_renamed'] = bad.pop('encoder.0.conv.weight')
    save_file(bad, path)
    with pytest.raises(RuntimeError, match=r'encoder\.0\.conv\.weight'):
        timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=path), **SMALL)


def test_pretrained_without_published_weights_raises_clearly(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)  # read at import time by huggingface_hub
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path))  # nothing cached either
    with pytest.raises(RuntimeError) as err:
        timm.create_model(MODEL, pretrained=True)
    msg = str(err.value)
    from timm_spot.models._releases import find_release
    rel = find_release(MODEL, None)
    assert (rel.repo_id if rel else 'has no pretrained weights') in msg
    assert 'pretrained_cfg_overlay' in msg


# ------------------------------------------------------------------------------------------------------------------
# Norm + act layers (timm's BatchNormAct2d) and the released weights
# ------------------------------------------------------------------------------------------------------------------

def _norm_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


@torch.no_grad()
def test_leak_and_bn_kwargs_reach_every_norm_act_layer():
    model = _small(leak=0.2, bn_momentum=0.1, bn_eps=1e-5)
    norms = _norm_layers(model)
    # E: 5, D: 4, R: 5 blocks with bn1 plus 4 pre-activations
    assert len(norms) == 5 + 4 + 5 + 4
    for m in norms:
        assert (m.momentum, m.eps) == (0.1, 1e-5)
        assert isinstance(m.act, nn.LeakyReLU) and m.act.negative_slope == 0.2 and not m.act.inplace
    # values: one train-mode encoder step moves the stem's running mean by momentum * batch mean
    x = _images(2, 32)
    stem = model.encoder[0]
    pre = stem.conv(x)
    model.train()
    out = stem(x)
    torch.testing.assert_close(stem.bn.running_mean, 0.1 * pre.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-7)
    z = (pre - pre.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(pre.var(dim=(0, 2, 3), unbiased=False,
                                                                         keepdim=True) + 1e-5)
    torch.testing.assert_close(out, F.leaky_relu(z, 0.2), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_norm_layer_and_act_layer_kwargs():
    x = _images(2, 32)
    relu = _small(act_layer='relu').eval()
    assert all(isinstance(m.act, nn.ReLU) for m in _norm_layers(relu))
    assert relu.encode(x).min() >= 0  # LeakyReLU features go negative, ReLU ones do not
    assert _small().eval().encode(x).min() < 0
    # a given norm_layer replaces the default BatchNorm settings (bn_eps applies to the default only)
    bn = _small(norm_layer=nn.BatchNorm2d, bn_eps=1e-2)
    assert {(m.eps, m.momentum) for m in _norm_layers(bn)} == {(1e-5, 0.1)}
    # the state dict is the same whichever norm / act is used
    assert list(relu.state_dict()) == list(_small().state_dict()) == list(bn.state_dict())


def _generator_releases():
    from timm_spot.models._releases import releases
    return [r.name for r in releases(MODEL)]


@pytest.mark.parametrize('name', _generator_releases())
def test_released_state_dict_keys_match_a_fresh_model(name):
    """The shipped safetensors keys are exactly those of a model built from its config.json (no remapping)."""
    import json
    from safetensors import safe_open
    folder = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'hub', name)
    with open(os.path.join(folder, 'config.json')) as f:
        model_args = json.load(f)['model_args']
    with safe_open(os.path.join(folder, 'model.safetensors'), framework='pt') as f:
        released = sorted(f.keys())
    model = timm.create_model(MODEL, **model_args)
    assert sorted(model.state_dict()) == released


# Outputs of the released generators in float32 eval mode, for the input and mask of
# test_released_generator_outputs_are_pinned (recorded when the layers moved to timm's ConvNormAct / BatchNormAct2d,
# bit-identical to the hand-written conv -> BatchNorm2d -> LeakyReLU layers before). Per tensor: (mean, mean |.|).
_PINNED = {
    'damage_repair_generator.spot_c10_64_v2': dict(
        phi=(0.5978516978766717, 0.6859681749677395),
        phi_hat=(0.5973324774831998, 0.6338633019565418),
        x_hat=(0.4424792172343987, 0.5220363176433492),
        autoencoded=(0.10865663225581557, 0.24681747704724208),
        x_hat_row=[[-0.05350322, -0.11037267, -0.15203114, -0.18509352],
                   [0.26144004, 0.20291640, 0.15401624, 0.12276006],
                   [0.27275306, 0.23133458, 0.19275960, 0.16759571]],
        forward=[[-0.07929777, 0.18956842, 0.15096118], [0.04035572, 0.17952429, 0.17082794]],
    ),
}


@pytest.mark.parametrize('name', sorted(_PINNED))
@torch.no_grad()
def test_released_generator_outputs_are_pinned(name):
    assert name in _generator_releases(), f'{name} is no longer a release: update _PINNED'
    root = os.path.dirname(os.path.dirname(__file__))
    model = timm.create_model(f"local-dir:{os.path.join(root, 'hub', name)}", pretrained=True).float().eval()
    want = _PINNED[name]
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    phi = model.encode(x)
    mask = model.sample_mask(2, phi.shape[-1], generator=torch.Generator().manual_seed(0))
    assert mask.flatten().nonzero().flatten().tolist() == [1, 7, 17, 21, 23, 26, 31]  # theta 0.7: 7 of 32 kept
    phi_hat = model.damage(phi, mask)
    x_hat = model.repair_decode(phi_hat, mask)
    got = dict(phi=phi, phi_hat=phi_hat, x_hat=x_hat, autoencoded=model.decode(phi))
    for key, t in got.items():
        stats = (t.double().mean().item(), t.double().abs().mean().item())
        assert stats == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    torch.testing.assert_close(x_hat[0, :, 10, 20:24], torch.tensor(want['x_hat_row']), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(x), torch.tensor(want['forward']), rtol=1e-5, atol=1e-6)


def test_repair_block_keeps_channels_last_and_its_values():
    """A channels-last feature map stays channels-last through a repair block (the mask is concatenated in that
    layout, not converted back by the next conv), with the same values as in NCHW."""
    torch.manual_seed(0)
    block = RepairBlock(6, preact=True).eval()
    _randomize_bn(block)
    x = torch.randn(3, 6, 8, 8)
    mask = (torch.rand(3, 1, 8, 8) > 0.5).float()
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out_cl = block.to(memory_format=torch.channels_last)(x_cl, mask)
        ref = block.to(memory_format=torch.contiguous_format)(x, mask)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, ref, rtol=1e-5, atol=1e-6)

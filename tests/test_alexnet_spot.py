"""Behaviour of alexnet_spot and alexnet_spot_discriminator: padding, LRN, heads, weight transfer, errors."""
import math

import pytest
import torch
import torch.nn.functional as F
import timm
from safetensors.torch import save_file

import timm_spot  # noqa: F401  (registers the models)
from timm_spot.models.alexnet_spot import SPOT_MEAN, SPOT_STD, AlexNetSpot, checkpoint_filter_fn


def _trained_discriminator(img_size=64, steps=2):
    """A discriminator whose BN running stats and weights are not at their init values."""
    torch.manual_seed(0)
    disc = timm.create_model('alexnet_spot_discriminator', head_kernel_size=img_size // 16)
    opt = torch.optim.SGD(disc.parameters(), lr=1e-3)
    disc.train()
    for _ in range(steps):
        real, mask = disc.forward_pretext(torch.rand(4, 3, img_size, img_size) * 2 - 1)
        (real.mean() + mask.mean()).backward()
        opt.step()
        opt.zero_grad()
    return disc.eval()


@pytest.mark.parametrize('size', [64, 96, 128, 100, 224])
def test_conv5_grid_is_tf_same(size):
    """TF 'SAME' padding: conv5 has ceil(H/16) cells, = the drop-mask grid for 16-px multiples."""
    model = timm.create_model('alexnet_spot').eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, size, size))
    assert feats.shape[-2:] == (math.ceil(size / 16), math.ceil(size / 16))


def test_conv1_padding_matches_tf_asymmetric_same():
    """At 128 px TF pads conv1 (11x11/4) by 3 before and 4 after; pool1 (3x3/2) by 0 before and 1 after."""
    model = timm.create_model('alexnet_spot').eval()
    conv1, pool1 = model.features.conv1, model.features.pool1
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        expected = F.conv2d(F.pad(x, (3, 4, 3, 4)), conv1.weight, conv1.bias, stride=4)
        torch.testing.assert_close(conv1(x), expected)
        y = torch.relu(expected)
        torch.testing.assert_close(pool1(y), F.max_pool2d(F.pad(y, (0, 1, 0, 1), value=-math.inf), 3, 2))


def test_lrn_matches_tensorflow_formula():
    """PyTorch LRN(size 5, alpha 1e-4) == TF LRN(depth_radius 2, alpha 2e-5, beta 0.75, bias 1)."""
    model = timm.create_model('alexnet_spot')
    x = torch.rand(2, 96, 5, 5) * 50  # lrn1 normalises the 96 conv1 channels
    sq = F.pad(x.pow(2), (0, 0, 0, 0, 2, 2))
    window = sum(sq[:, i:i + x.shape[1]] for i in range(5))
    expected = x / (1.0 + 2e-5 * window).pow(0.75)
    torch.testing.assert_close(model.features.lrn1(x), expected)


def test_pretrained_cfg_normalisation_is_the_authors():
    """timm's (x - mean) / std with the cfg equals 0..255 RGB minus (123.68, 116.78, 103.94)."""
    cfg = timm.create_model('alexnet_spot').pretrained_cfg
    img01 = torch.rand(1, 3, 4, 4)
    timm_norm = (img01 - torch.tensor(cfg['mean']).view(1, 3, 1, 1)) / torch.tensor(cfg['std']).view(1, 3, 1, 1)
    authors = img01 * 255 - torch.tensor([123.68, 116.78, 103.94]).view(1, 3, 1, 1)
    torch.testing.assert_close(timm_norm, authors, rtol=1e-5, atol=1e-3)
    disc = timm.create_model('alexnet_spot_discriminator')
    torch.testing.assert_close(disc.normalize_input(img01 * 2 - 1), authors, rtol=1e-5, atol=1e-3)
    assert cfg['mean'] == SPOT_MEAN and cfg['std'] == SPOT_STD and cfg['num_classes'] == 0


def test_discriminator_trunk_loads_into_backbone_without_missing_or_unexpected_keys():
    disc = _trained_discriminator()
    # same names: trunk keys load straight into alexnet_spot(norm5=True)
    trunk = {k: v for k, v in disc.state_dict().items() if k.startswith('features.')}
    with_norm = timm.create_model('alexnet_spot', norm5=True)
    result = with_norm.load_state_dict(trunk, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # default backbone: BN folded into conv5, exact in eval mode
    backbone = timm.create_model('alexnet_spot').eval()
    result = backbone.load_state_dict(disc.backbone_state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = disc.normalize_input(torch.rand(2, 3, 64, 64) * 2 - 1)
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_features(x), disc.forward_features(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(with_norm.eval().forward_features(x), disc.forward_features(x))


def test_discriminator_file_loads_through_timm_pretrained_overlay(tmp_path):
    """A full discriminator safetensors file loads as alexnet_spot (heads dropped, BN folded) via timm."""
    disc = _trained_discriminator()
    path = tmp_path / 'discriminator.safetensors'
    save_file({k: v.contiguous() for k, v in disc.state_dict().items()}, str(path))
    backbone = timm.create_model('alexnet_spot', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = disc.normalize_input(torch.rand(1, 3, 64, 64) * 2 - 1)
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_features(x), disc.forward_features(x), rtol=1e-4, atol=1e-4)
    reloaded = timm.create_model(
        'alexnet_spot_discriminator', head_kernel_size=4, pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path))).eval()
    for k, v in disc.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    # fresh classifier and single-channel input on top of the transferred trunk
    clf = timm.create_model('alexnet_spot', pretrained=True, num_classes=5, in_chans=1,
                            pretrained_cfg_overlay=dict(file=str(path)))
    assert clf(torch.randn(2, 1, 64, 64)).shape == (2, 5)
    torch.testing.assert_close(clf.features.conv1.weight, backbone.features.conv1.weight.sum(1, keepdim=True))


def test_mismatched_checkpoint_names_the_keys_and_file(tmp_path):
    path = tmp_path / 'other.safetensors'
    sd = timm.create_model('alexnet_spot').state_dict()
    sd['features.conv9.weight'] = sd.pop('features.conv3.weight')
    save_file(sd, str(path))
    with pytest.raises(RuntimeError, match=r'(?s)other\.safetensors.*features\.conv3\.weight'):
        timm.create_model('alexnet_spot', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_truncated_weights_file_gives_clear_error(tmp_path):
    path = tmp_path / 'model.safetensors'
    save_file(timm.create_model('alexnet_spot').state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match=r'model\.safetensors'):
        timm.create_model('alexnet_spot', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_pretrained_without_published_weights_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hc, 'HF_HUB_CACHE', str(tmp_path))
    from timm_spot.models._releases import find_release
    for name in ('alexnet_spot', 'alexnet_spot_discriminator'):
        # a release not in the cache: the repo and the offline routes; no release: says so (never random weights)
        what = 'timm-spot/' if find_release(name, None) else 'has no pretrained weights'
        with pytest.raises(RuntimeError, match=rf'(?s){what}.*pretrained_cfg_overlay'):
            timm.create_model(name, pretrained=True)


def test_both_pretext_heads_get_gradients():
    """Replaces timm's generic backward check, which only sees forward() (the real/corrupt head)."""
    disc = timm.create_model('alexnet_spot_discriminator', head_kernel_size=4).train()
    real, mask = disc.forward_pretext(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert real.shape == (2,) and mask.shape == (2, 1, 4, 4)
    (real.sum() + mask.sum()).backward()
    missing = [n for n, p in disc.named_parameters() if p.grad is None]
    assert not missing


def test_mask_head_is_local_to_conv5_cells():
    """The mask logit of a cell depends on conv5 cells within its 3x3 neighbourhood only."""
    disc = timm.create_model('alexnet_spot_discriminator', head_kernel_size=4).eval()
    feats = torch.rand(1, 256, 6, 6)
    base = disc.forward_mask(feats)
    changed = feats.clone()
    changed[..., 5, 5] += 10
    diff = (disc.forward_mask(changed) - base).abs()[0, 0]
    assert diff[0:4, :].max() == 0 and diff[:, 0:4].max() == 0 and diff[4:, 4:].min() > 0


def test_no_mask_head_ablation():
    disc = timm.create_model('alexnet_spot_discriminator', mask_head=False, head_kernel_size=4)
    real, mask = disc.forward_pretext(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert mask is None and real.shape == (2,)
    assert not any(k.startswith('mask_head') for k in disc.state_dict())


def test_fc_transfer_head_and_unpooled_output():
    model = timm.create_model('alexnet_spot', head_type='fc', num_classes=10).eval()
    x = torch.randn(2, 3, 96, 96)
    assert model(x).shape == (2, 10)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 4096)
    assert {'pre_logits.fc6.weight', 'pre_logits.fc7.weight'} <= set(model.state_dict())
    model.reset_classifier(0, '')  # fc6/fc7 span the whole map: without pooling the model returns conv5 cells
    assert model(x).shape == (2, 256, 6, 6)


def test_forward_intermediates_are_the_post_relu_conv_outputs():
    model = timm.create_model('alexnet_spot').eval()
    x = torch.randn(1, 3, 64, 64)
    seen = {}
    for name in ('act1', 'act2', 'act3', 'act4', 'act5'):
        getattr(model.features, name).register_forward_hook(lambda m, i, o, n=name: seen.setdefault(n, o))
    final, taps = model.forward_intermediates(x)
    assert [t.shape[1] for t in taps] == [96, 256, 384, 384, 256]
    for name, tap in zip(('act1', 'act2', 'act3', 'act4', 'act5'), taps):
        assert torch.equal(seen[name], tap) and tap.min() >= 0
    assert torch.equal(final, model.forward_features(x))


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model('alexnet_spot', num_classes=3).train()
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-4, atol=1e-5)


def test_unknown_argument_raises():
    with pytest.raises(TypeError):
        timm.create_model('alexnet_spot', not_an_arg=1)
    with pytest.raises(ValueError, match='head_type'):
        timm.create_model('alexnet_spot', head_type='mlp')


def test_filter_passes_plain_backbone_checkpoints_through():
    model = AlexNetSpot(num_classes=0)
    sd = model.state_dict()
    assert checkpoint_filter_fn(dict(sd), model).keys() == sd.keys()


def test_pretrained_tags_carry_their_input_size(tmp_path):
    """A 64-px release is 64-px weights: the discriminator's fc6 spans the 4x4 conv5 map of that size."""
    from timm_spot.models._releases import find_release, release_cfg
    cfg64 = release_cfg('alexnet_spot_discriminator', 'spot_c10_64_test', 64)
    disc = timm.create_model('alexnet_spot_discriminator', pretrained_cfg=cfg64)
    assert disc.pretrained_cfg['input_size'] == (3, 64, 64) and disc.pre_logits.kernel_size == 4
    rel = find_release('alexnet_spot_discriminator', None)  # default: its first release, else the paper's 128 px
    assert timm.create_model('alexnet_spot_discriminator').pre_logits.kernel_size == (rel.img_size if rel else 128) // 16
    path = tmp_path / 'd.safetensors'
    save_file({k: v.contiguous() for k, v in disc.state_dict().items()}, str(path))
    loaded = timm.create_model('alexnet_spot_discriminator', pretrained=True, pretrained_cfg=cfg64,
                               pretrained_cfg_overlay=dict(file=str(path)))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in disc.state_dict().items())
    backbone = timm.create_model('alexnet_spot.spot_c10_64', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert backbone.pretrained_cfg['input_size'] == (3, 64, 64) and backbone.num_classes == 0

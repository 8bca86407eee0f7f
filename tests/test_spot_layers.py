"""The fast trunk layers compute what the reference layers compute: values and gradients, fp32 and bf16, any size;
the released weights give the same outputs through them."""
import os

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import create_pool2d

import timm_spot  # noqa: F401  (registers the models)
from timm_spot.models._spot_layers import LocalResponseNorm, MaxPool2dTfSame, reference_trunk

HUB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'hub')


@pytest.mark.parametrize('channels_last', [False, True])
def test_max_pool_tf_same_equals_timm_padded_pool_at_every_size(channels_last):
    ref, fast = create_pool2d('max', 3, stride=2, padding='same'), MaxPool2dTfSame(3, 2)
    for h in range(1, 34):
        for w in (h, h + 1, h + 6):
            x = torch.randn(2, 4, h, w)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = fast(x)
            assert out.shape[-2:] == (-(-h // 2), -(-w // 2))
            assert torch.equal(out, ref(x)), (h, w)


@pytest.mark.parametrize('kernel,stride', [(2, 2), (1, 2), (3, 1), (5, 3)])
def test_max_pool_tf_same_other_kernels(kernel, stride):
    ref, fast = create_pool2d('max', kernel, stride=stride, padding='same'), MaxPool2dTfSame(kernel, stride)
    for h in range(1, 20):
        x = torch.randn(1, 2, h, h + 3)
        assert torch.equal(fast(x), ref(x)), (kernel, stride, h)


def test_max_pool_gradient_equals_reference():
    x = torch.randn(2, 3, 13, 16, requires_grad=True)
    g = torch.randn(2, 3, 7, 8)
    (MaxPool2dTfSame(3, 2)(x) * g).sum().backward()
    fast_grad, x.grad = x.grad, None
    (create_pool2d('max', 3, stride=2, padding='same')(x) * g).sum().backward()
    assert torch.equal(fast_grad, x.grad)


@pytest.mark.parametrize('channels', [1, 5, 96])
def test_lrn_equals_torch_lrn_values_and_gradients(channels):
    torch.manual_seed(0)
    x = (torch.rand(2, channels, 7, 6) * 300).requires_grad_()  # the spot trunk's activation scale
    fast, ref = LocalResponseNorm(channels, 5, 1e-4, 0.75, 1.0), nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0)
    g = torch.randn(2, channels, 7, 6)
    out = fast(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)
    (out * g).sum().backward()
    fast_grad, x.grad = x.grad, None
    (ref(x) * g).sum().backward()
    torch.testing.assert_close(fast_grad, x.grad, rtol=1e-4, atol=1e-6)
    assert len(fast.state_dict()) == 0 and not list(fast.buffers())  # the band matrix is built per call


def test_lrn_bf16_autocast_channels_last_stays_within_bf16_rounding():
    """In bf16 only the squares and the output are rounded (the factor is computed in float32, as torch's LRN under
    autocast): within two bf16 roundings (2 x 2**-8) of the float32 result, in the input's dtype and layout."""
    torch.manual_seed(0)
    x = (torch.rand(4, 96, 14, 14) * 300).bfloat16().contiguous(memory_format=torch.channels_last)
    truth = nn.LocalResponseNorm(5, 5 * 2e-5, 0.75, 1.0)(x.float())
    with torch.autocast('cpu', torch.bfloat16):
        out = LocalResponseNorm(96, 5, 5 * 2e-5, 0.75, 1.0)(x)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    rel = ((out.float() - truth).abs() / truth.abs().clamp_min(1e-3))
    assert rel.max() < 2 * 2 ** -8 and rel.mean() < 3e-3


def _released(name):
    path = os.path.join(HUB, f'{name}.spot_c10_64_v2', 'model.safetensors')
    kwargs = {'head_kernel_size': 4} if 'discriminator' in name else {}
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs).eval()


@pytest.mark.parametrize('name', ['alexnet_spot', 'alexnet_spot_discriminator'])
def test_released_weights_give_the_reference_layers_outputs(name):
    """The released models through the fast layers == the same weights through the reference layers."""
    model = _released(name)
    x = torch.randn(3, 3, 64, 64) * 60
    with torch.no_grad():
        fast = model.forward_features(x)
        model.features = reference_trunk(model.features)
        ref = model.forward_features(x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-4)


def test_grad_checkpointing_turns_in_place_relus_off_and_back_on():
    model = timm.create_model('alexnet_spot')
    acts = [m for m in model.features if isinstance(m, nn.ReLU)]
    assert all(a.inplace for a in acts)
    model.set_grad_checkpointing(True)
    assert not any(a.inplace for a in acts)
    model.set_grad_checkpointing(False)
    assert all(a.inplace for a in acts)

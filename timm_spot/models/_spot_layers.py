"""AlexNet trunk layers that compute exactly what TF / torch compute, on fast CPU kernels.

* :class:`MaxPool2dTfSame`: TF-'SAME' max pooling without padding the input. timm's ``MaxPool2dSame`` pads with
  ``-inf`` by ``F.pad`` (a full copy, and a channels-last input comes back NCHW, on a slow bf16 pooling kernel);
  here the same windows come from ``max_pool2d``'s own implicit padding plus ``ceil_mode`` for the one extra
  row/column on the bottom/right.
* :class:`LocalResponseNorm`: ``nn.LocalResponseNorm``'s formula, ``x / (k + alpha/n * sum_window x^2)^beta``,
  with the channel-window sum as a 1x1 convolution by a fixed band matrix (one matmul-shaped kernel that runs in
  bf16 and channels-last) instead of torch's pad + ``avg_pool3d`` (no fast bf16 CPU kernel) + 4 elementwise passes.

Both have no parameters, so state dicts are unchanged. :func:`reference_trunk` rebuilds a trunk on the reference
layers they replace; tests/test_spot_layers.py and benchmarks/backbone_speed.py compare the two.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import create_pool2d, get_same_padding, pad_same
from timm.models import register_notrace_module

__all__ = ['MaxPool2dTfSame', 'LocalResponseNorm', 'reference_trunk']


@register_notrace_module  # reason: the padding depends on the input size
class MaxPool2dTfSame(nn.Module):
    """Max pooling with TF-'SAME' padding (as ``create_pool2d('max', k, stride=s, padding='same')``), no copy."""

    def __init__(self, kernel_size: int = 3, stride: int = 2) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size, self.stride
        pad_h = get_same_padding(x.shape[-2], k, s, 1)  # TF 'SAME' totals; the odd pixel goes after
        pad_w = get_same_padding(x.shape[-1], k, s, 1)
        out = F.max_pool2d(x, k, s, padding=(pad_h // 2, pad_w // 2), ceil_mode=pad_h % 2 == 1 or pad_w % 2 == 1)
        if out.shape[-2] != -(-x.shape[-2] // s) or out.shape[-1] != -(-x.shape[-1] // s):
            # ceil_mode overshot on the axis without an odd pad (possible only when kernel <= stride): pad
            # explicitly, as timm's MaxPool2dSame does
            out = F.max_pool2d(pad_same(x, [k, k], [s, s], value=-float('inf')), k, s)
        return out

    def extra_repr(self) -> str:
        return f'kernel_size={self.kernel_size}, stride={self.stride}, padding=tf_same'


class LocalResponseNorm(nn.Module):
    """Cross-channel LRN over ``num_channels`` channels, ``nn.LocalResponseNorm(size, alpha, beta, k)`` semantics
    (alpha divided by size, zero padding at the ends). No parameters or buffers: the 0/1 band matrix is built per
    call on the input's device (microseconds), so meta-device construction, ``.to(dtype)`` and state dicts are
    unaffected."""

    def __init__(self, num_channels: int, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                 k: float = 1.0) -> None:
        super().__init__()
        self.num_channels, self.size, self.alpha, self.beta, self.k = num_channels, size, alpha, beta, k

    def band(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[C, C, 1, 1]: output channel i sums channels i - size // 2 .. i + (size - 1) // 2 (torch's window)."""
        idx = torch.arange(self.num_channels, device=device)
        offset = idx[None, :] - idx[:, None]
        return ((offset >= -(self.size // 2)) & (offset <= (self.size - 1) // 2)).to(dtype)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sq = x * x
        window = F.conv2d(sq, self.band(x.device, sq.dtype))  # sum of squares over the channel window (exact ones)
        # the factor in float32 (as torch's LRN under autocast, which runs avg_pool3d in float32): bf16 inputs lose
        # only the rounding of their squares and of the output (which the next conv would round to bf16 anyway)
        return (x * (window.float() * (self.alpha / self.size) + self.k).pow(-self.beta)).to(x.dtype)

    def extra_repr(self) -> str:
        return f'{self.num_channels}, size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}'


def reference_trunk(features: nn.Sequential) -> nn.Sequential:
    """The same trunk (shared parameters) on the layers the fast ones stand for: timm's ``MaxPool2dSame`` (pads with
    ``-inf`` by ``F.pad``), torch's ``nn.LocalResponseNorm`` and out-of-place ReLUs. For checks, not for use."""
    ref = nn.Sequential()
    for name, m in features.named_children():
        if isinstance(m, MaxPool2dTfSame):
            m = create_pool2d('max', m.kernel_size, stride=m.stride, padding='same')
        elif isinstance(m, LocalResponseNorm):
            m = nn.LocalResponseNorm(m.size, m.alpha, m.beta, m.k)
        elif isinstance(m, nn.ReLU):
            m = nn.ReLU()
        ref.add_module(name, m)
    return ref

"""AlexNet backbone of "Self-Supervised Feature Learning by Learning to Spot Artifacts" (``alexnet_spot``).

Paper: Jenni & Favaro, CVPR 2018, https://arxiv.org/abs/1806.05024 ; authors' TF demo code:
https://github.com/sjenni/LearningToSpotArtifacts (models/AlexNet.py).

The transferable part of the pretext discriminator: AlexNet conv1..conv5 (LRN after conv1/conv2, grouped
conv2/4/5, TF 'SAME' padding, no pool5), so the conv5 grid equals the drop-mask grid. Inputs are normalised as
the authors' code (0..255 minus the RGB means), which the pretrained cfgs carry as timm ``mean``/``std``
(``SPOT_MEAN``, ``SPOT_STD``). :func:`checkpoint_filter_fn` folds a discriminator's pretext-only conv5 BatchNorm
into conv5 (``norm5=True`` keeps it). Head: ``num_classes=0`` (pooled 256-d conv5 features) in the pretrained
cfgs; ``num_classes=N`` adds a linear classifier (``head_type='linear'``) or the paper's transfer head
(``head_type='fc'``: fc6/fc7 as convolutions, random init).

The architecture, the paper vs the authors' code and the choices made here: docs/method.md.
"""
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights
from timm.layers import ClassifierHead, create_conv2d, get_device_dtype
from timm.models import checkpoint_seq, generate_default_cfgs, register_model, register_notrace_module
from timm.models._features import feature_take_indices  # private: timm 1.0.31 has no public name for it

from ._spot_builder import PAPER_CFG, build_spot_model
from ._spot_layers import LocalResponseNorm, MaxPool2dTfSame
from ._releases import release_cfgs

__all__ = ['AlexNetSpot', 'ConvFcHead', 'SPOT_MEAN', 'SPOT_STD', 'checkpoint_filter_fn', 'fold_batchnorm']

# the authors' input normalisation (RGB 0..255 minus these means, no scaling), in timm's 0..1 convention
SPOT_MEAN = (123.68 / 255.0, 116.78 / 255.0, 103.94 / 255.0)
SPOT_STD = (1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0)

BN_MOMENTUM = 0.025  # TF decay 0.975
BN_EPS = 1e-3

# tap names (after each ReLU) in ``features``: the conv1..conv5 outputs used by linear probes
_TAPS = ('act1', 'act2', 'act3', 'act4', 'act5')


@register_notrace_module  # reason: shape-dependent pooling for inputs smaller than the fc6 kernel
class ConvFcHead(nn.Module):
    """AlexNet's fully connected layers written as convolutions (fc6 spans ``kernel_size`` cells).

    Inputs smaller than the kernel are average-pooled up to it (as timm's VGG ``ConvMlp``); larger inputs give
    a spatial map that the following ``ClassifierHead`` pools, so any input size works.
    """

    def __init__(
            self,
            in_chs: int,
            hidden_size: int = 4096,
            kernel_size: int = 6,
            num_layers: int = 2,
            drop_rate: float = 0.5,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert num_layers in (1, 2), 'fc head has fc6 or fc6 + fc7'
        self.kernel_size = kernel_size
        self.fc6 = nn.Conv2d(in_chs, hidden_size, kernel_size, bias=True, **dd)
        self.act6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(drop_rate)
        if num_layers == 2:
            self.fc7 = nn.Conv2d(hidden_size, hidden_size, 1, bias=True, **dd)
            self.act7 = nn.ReLU(inplace=True)
            self.drop7 = nn.Dropout(drop_rate)
        else:
            self.fc7 = nn.Identity()
            self.act7 = nn.Identity()
            self.drop7 = nn.Identity()
        self.out_chs = hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < self.kernel_size or x.shape[-1] < self.kernel_size:
            x = F.adaptive_avg_pool2d(x, (max(self.kernel_size, x.shape[-2]), max(self.kernel_size, x.shape[-1])))
        if x.shape[-2] == self.kernel_size and x.shape[-1] == self.kernel_size:
            # fc6 spans the whole map (the pretext discriminator's case): the convolution is one matrix product,
            # computed as such (same parameters and result; CPU convolution kernels are slow for this shape)
            w = self.fc6.weight
            if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
                # channels-last weights: flatten both sides in (h, w, c) order, views instead of a 64 MB copy
                x = F.linear(x.permute(0, 2, 3, 1).flatten(1), w.permute(0, 2, 3, 1).flatten(1), self.fc6.bias)
            else:
                x = F.linear(x.flatten(1), w.flatten(1), self.fc6.bias)
            x = x[:, :, None, None]
        else:
            x = self.fc6(x)
        x = self.drop6(self.act6(x))
        return self.drop7(self.act7(self.fc7(x)))


def _make_trunk(in_chans: int, norm5: bool, dd: Dict[str, Any]) -> nn.Sequential:
    """conv1..conv5 with TF-'SAME' padding, module names shared by backbone and discriminator.

    Pooling and LRN are the copy-free, bf16-friendly equivalents in ``_spot_layers`` (same outputs as timm's
    ``create_pool2d('max', 3, 2, padding='same')`` and ``nn.LocalResponseNorm``). ReLUs run in place (each follows a
    conv or a BatchNorm, whose backward does not need its output; a fresh output tensor costs page faults on CPU)
    except under gradient checkpointing, where a segment may start with one (:func:`set_inplace_acts`).
    """
    return nn.Sequential(OrderedDict([
        ('conv1', create_conv2d(in_chans, 96, 11, stride=4, padding='same', bias=True, **dd)),
        ('act1', nn.ReLU(inplace=True)),
        ('pool1', MaxPool2dTfSame(3, stride=2)),
        ('lrn1', LocalResponseNorm(96, 5, alpha=5 * 2e-5, beta=0.75, k=1.0)),
        ('conv2', create_conv2d(96, 256, 5, padding='same', groups=2, bias=True, **dd)),
        ('act2', nn.ReLU(inplace=True)),
        ('pool2', MaxPool2dTfSame(3, stride=2)),
        ('lrn2', LocalResponseNorm(256, 5, alpha=5 * 2e-5, beta=0.75, k=1.0)),
        ('conv3', create_conv2d(256, 384, 3, padding='same', bias=True, **dd)),
        ('act3', nn.ReLU(inplace=True)),
        ('conv4', create_conv2d(384, 384, 3, padding='same', groups=2, bias=True, **dd)),
        ('act4', nn.ReLU(inplace=True)),
        ('conv5', create_conv2d(384, 256, 3, padding='same', groups=2, bias=True, **dd)),
        ('norm5', nn.BatchNorm2d(256, eps=BN_EPS, momentum=BN_MOMENTUM, **dd) if norm5 else nn.Identity()),
        ('act5', nn.ReLU(inplace=True)),
    ]))


def set_inplace_acts(features: nn.Sequential, inplace: bool) -> None:
    """ReLUs in place, or not: a checkpointed segment that starts with an in-place ReLU would overwrite the
    segment input it keeps for recomputation."""
    for m in features:
        if isinstance(m, nn.ReLU):
            m.inplace = inplace


class AlexNetSpot(nn.Module):
    """AlexNet conv1..conv5 (TF-'SAME' padding, no pool5) with timm's full model API.

    ``forward_features`` returns the conv5 map (after ReLU), ``num_features`` = 256, 5 feature taps
    (conv1..conv5 after ReLU, strides 4, 8, 16, 16, 16).
    """

    def __init__(
            self,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            head_type: str = 'linear',
            fc_hidden_size: int = 4096,
            fc_kernel_size: int = 6,
            fc_drop_rate: float = 0.5,
            fc_layers: int = 2,
            norm5: bool = False,
            bias_init: float = 0.1,
            freeze_trunk: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            num_classes: classifier outputs; 0 = no classifier (pooled features), the pretrained cfgs' default.
            in_chans: input channels.
            global_pool: 'avg', 'max', 'avgmax', 'catavgmax' or '' (no pooling).
            drop_rate: dropout before the classifier.
            head_type: 'linear' (pool + classifier) or 'fc' (paper's transfer head: fc6/fc7, then classifier).
            fc_hidden_size: fc6/fc7 width for head_type='fc'.
            fc_kernel_size: fc6 kernel in conv5 cells for head_type='fc' (6 as AlexNet's 6x6 pool5 map).
            fc_drop_rate: dropout after fc6/fc7.
            fc_layers: 2 (fc6 + fc7, AlexNet) or 1 (fc6 only, the pretext discriminator's head).
            norm5: keep the pretext BatchNorm after conv5 (the paper removes it for transfer).
            bias_init: initial conv bias (0.1 in the authors' discriminator).
            freeze_trunk: conv1-conv5 get ``requires_grad=False``, so only the head trains: the paper's frozen-conv5
                transfer protocol through any trainer that optimises trainable parameters only (timm's
                ``train.py --model-kwargs freeze_trunk=True``).
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if head_type not in ('linear', 'fc'):
            raise ValueError(f"head_type must be 'linear' or 'fc', got {head_type!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.head_type = head_type
        self.grad_checkpointing = False

        self.features = _make_trunk(in_chans, norm5, dd)
        names = list(self.features._modules.keys())
        self.feature_ends = [names.index(t) for t in _TAPS]
        self.feature_info = [
            dict(num_chs=c, reduction=r, module=f'features.{t}')
            for c, r, t in zip((96, 256, 384, 384, 256), (4, 8, 16, 16, 16), _TAPS)
        ]
        self.num_features = 256
        if head_type == 'fc':
            self.pre_logits = ConvFcHead(
                self.num_features, fc_hidden_size, fc_kernel_size, num_layers=fc_layers, drop_rate=fc_drop_rate, **dd)
            self.fc_hidden_size = fc_hidden_size
        else:
            self.pre_logits = nn.Identity()
            self.fc_hidden_size = 0
        self.use_fc = False
        self.head = self._make_head(num_classes, global_pool, dd)
        self.head_hidden_size = self.head.num_features
        self._init_weights(bias_init)
        self.freeze_trunk = freeze_trunk
        if freeze_trunk:
            self.features.requires_grad_(False)

    def _init_weights(self, bias_init: float) -> None:
        # Glorot-uniform kernels (TF's default initializer, as in the authors' code), constant conv biases
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, bias_init)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^features\.conv1',
            blocks=[(r'^features\.(?:conv|norm)(\d+)', None), (r'^pre_logits', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        set_inplace_acts(self.features, not enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def _make_head(self, num_classes: int, global_pool: str, dd: Dict[str, Any]) -> ClassifierHead:
        # fc6/fc7 span the whole conv5 map, a global operation like pooling: without pooling (global_pool='')
        # they are bypassed and the model returns conv5 cells (or per-cell 1x1-conv logits), as timm expects
        self.use_fc = self.fc_hidden_size > 0 and global_pool != ''
        in_features = self.fc_hidden_size if self.use_fc else self.num_features
        return ClassifierHead(in_features, num_classes, pool_type=global_pool, drop_rate=self.drop_rate, **dd)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is None:
            global_pool = self.head.global_pool.pool_type
        self.num_classes = num_classes
        self.head = self._make_head(num_classes, global_pool, get_device_dtype(self))
        self.head.train(self.training)
        self.head_hidden_size = self.head.num_features

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward returning the conv1..conv5 taps (post-ReLU) selected by ``indices``.

        Args:
            x: input images (normalised as the pretrained cfg says).
            indices: last n taps if int, all if None, the listed taps if a sequence (0 = conv1 .. 4 = conv5).
            norm: unused (no final norm).
            stop_early: stop after the last requested tap.
            output_fmt: only 'NCHW'.
            intermediates_only: return the taps only.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_ends), indices)
        last_idx = len(self.feature_ends) - 1
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            layers = self.features
        else:
            layers = self.features[:self.feature_ends[max_index] + 1]
        feat_idx = 0
        for i, layer in enumerate(layers):
            x = layer(x)
            if i == self.feature_ends[feat_idx]:
                if feat_idx in take_indices:
                    intermediates.append(x)
                feat_idx = min(feat_idx + 1, last_idx)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop layers after the last tap in ``indices`` (and the head if asked or needed)."""
        take_indices, max_index = feature_take_indices(len(self.feature_ends), indices)
        prune_end = max_index < len(self.feature_ends) - 1
        self.features = self.features[:self.feature_ends[max_index] + 1]
        if prune_end:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.pre_logits = nn.Identity()
            self.fc_hidden_size = 0
            self.num_classes = 0
            self.head = self._make_head(0, '', get_device_dtype(self))
            self.head.train(self.training)
            self.head_hidden_size = self.head.num_features
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.features, x)
        else:
            x = self.features(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.use_fc:
            x = self.pre_logits(x)
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def fold_batchnorm(
        conv_weight: torch.Tensor,
        conv_bias: torch.Tensor,
        bn_state: Dict[str, torch.Tensor],
        eps: float = BN_EPS,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows a conv into the conv's weight and bias (exact), via torch's fusion."""
    weight, bias = fuse_conv_bn_weights(
        conv_weight, conv_bias, bn_state['running_mean'], bn_state['running_var'], eps,
        bn_state['weight'], bn_state['bias'])
    return weight.detach(), bias.detach()


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: AlexNetSpot) -> Dict[str, torch.Tensor]:
    """Adapt a backbone or pretext-discriminator checkpoint to ``model``.

    * pretext heads (``mask_head.*``, its real/corrupt ``pre_logits.*`` / ``head.*``) are dropped;
    * ``features.norm5.*`` is folded into conv5 when ``model`` has no norm5 (exact in eval mode);
    * bfloat16 tensors (the released discriminator is stored in bfloat16) are upcast to float32 first, so the fold
      is computed in float32.
    """
    if 'state_dict' in state_dict and isinstance(state_dict['state_dict'], dict):
        state_dict = state_dict['state_dict']
    out = {k: v.float() if isinstance(v, torch.Tensor) and v.dtype in (torch.bfloat16, torch.float16) else v
           for k, v in state_dict.items()}
    if 'mask_head.weight' in out:  # a pretext discriminator checkpoint: keep the trunk only
        out = {k: v for k, v in out.items() if k.startswith('features.')}
    has_norm5 = isinstance(model.features.norm5, nn.BatchNorm2d) if hasattr(model.features, 'norm5') else False
    if not has_norm5 and 'features.norm5.weight' in out:
        bn = {n: out.pop(f'features.norm5.{n}') for n in ('weight', 'bias', 'running_mean', 'running_var')}
        out.pop('features.norm5.num_batches_tracked', None)
        out['features.conv5.weight'], out['features.conv5.bias'] = fold_batchnorm(
            out['features.conv5.weight'], out['features.conv5.bias'], bn)
    return out


def _create_alexnet_spot(variant: str, pretrained: bool = False, **kwargs: Any) -> AlexNetSpot:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3, 4))
    return build_spot_model(
        AlexNetSpot,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'num_classes': 0, 'input_size': (3, 128, 128), 'pool_size': (8, 8),
        'crop_pct': 0.85, 'interpolation': 'bicubic',
        'mean': SPOT_MEAN, 'std': SPOT_STD,
        'first_conv': 'features.conv1', 'classifier': 'head.fc',
        **PAPER_CFG,
        **kwargs,
    }


# pretrained tags: one per released (model, tag) row of ._releases (default tag first); none claims weights that
# do not ship in hub/<model>.<tag>/
default_cfgs = generate_default_cfgs(release_cfgs(
    'alexnet_spot', _cfg, lambda size: dict(pool_size=(-(-size // 16), -(-size // 16)))))


@register_model
def alexnet_spot(pretrained: bool = False, **kwargs: Any) -> AlexNetSpot:
    """AlexNet conv1..conv5 trained by spotting artifacts (Jenni & Favaro, CVPR 2018)."""
    return _create_alexnet_spot('alexnet_spot', pretrained=pretrained, **kwargs)

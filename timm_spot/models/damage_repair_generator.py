"""Damage & repair generator of "Learning to Spot Artifacts" (``damage_repair_generator``).

Paper: Jenni & Favaro, CVPR 2018, https://arxiv.org/abs/1806.05024 ; authors' TF demo code:
https://github.com/sjenni/LearningToSpotArtifacts (models/AutoEncoder.py, models/SpotNet.py, layers.py).

An autoencoder {E, D} whose output ``D(E(x))`` is the discriminator's 'real' example, and the damage & repair path
that makes its 'corrupt' example: cells of ``phi = E(x)`` are dropped (mask Omega), filled with a 3x3 average, and
repaired by gated residual blocks R interleaved with the decoder. Layers are timm's (``ConvNormAct``,
``create_conv2d``, ``BatchNormAct2d``); :class:`DamageRepairGenerator` lists the methods the trainer uses and the
timm API (``forward_features`` returns the generated image).

The architecture, the paper vs the authors' code and the choices made here: docs/method.md.
"""
import math
from collections import OrderedDict
from functools import partial
from itertools import chain
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import BatchNormAct2d, ClassifierHead, ConvNormAct, LayerType, create_conv2d, get_device_dtype, \
    get_norm_act_layer
from timm.models import checkpoint, checkpoint_seq, generate_default_cfgs, register_model, register_notrace_function
from timm.models._features import feature_take_indices  # private: timm 1.0.31 has no public name for it

from ._spot_builder import PAPER_CFG, build_spot_model, upcast_state_dict
from ._releases import release_cfgs

__all__ = ['DamageRepairGenerator']

_FILL_TYPES = ('avg', 'noise')
_REPAIR_TYPES = ('distributed', 'local', 'none')


# ---------------------------------------------------------------------------------------------------------------
# Helpers that look at tensor shapes or draw random numbers. torch.fx cannot trace data-dependent Python (it sees
# shapes as proxies), so they are registered as leaf functions: an fx trace records one call and runs them on real
# tensors. NOTE fx only auto-wraps module globals whose name does not start with '_', hence the public-looking names
# (they are not in __all__). All are TorchScript-compatible.
# ---------------------------------------------------------------------------------------------------------------

@register_notrace_function
def check_image_input(x: torch.Tensor, in_chans: int, stride: int) -> torch.Tensor:
    """Raise ValueError unless ``x`` is ``[B, in_chans, H, W]`` with H and W multiples of ``stride``."""
    if x.dim() != 4:
        raise ValueError(f'expected an image batch [B, C, H, W], got a tensor with {x.dim()} dims')
    if x.shape[1] != in_chans:
        raise ValueError(f'input has {x.shape[1]} channels, the model expects in_chans={in_chans} channels')
    h, w = x.shape[2], x.shape[3]
    if h % stride != 0 or w % stride != 0:
        raise ValueError(f'input size {h}x{w} is not a multiple of the encoder stride {stride}')
    return x


@register_notrace_function
def check_drop_mask(mask: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Raise ValueError unless ``mask`` is ``[B, 1, M, N]`` matching the batch and grid of ``ref``."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != ref.shape[0] \
            or mask.shape[2] != ref.shape[2] or mask.shape[3] != ref.shape[3]:
        raise ValueError(
            f'mask of shape {list(mask.shape)} does not match the feature grid: expected '
            f'[{ref.shape[0]}, 1, {ref.shape[2]}, {ref.shape[3]}]')
    return mask.to(ref.dtype)


def sample_drop_mask(
        batch_size: int,
        height: int,
        width: int,
        theta: float,
        generator: Optional[torch.Generator] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Per-cell drop mask Omega ``[B, 1, M, N]``: 0 (dropped) with probability ``theta``, else 1 (kept).
    The one mask sampler of the project (the model's ``sample_mask``, the trainer's figure masks)."""
    if theta < 0. or theta > 1.:
        raise ValueError(f'theta (drop rate) must be in [0, 1], got {theta}')
    u = torch.rand([batch_size, 1, height, width], generator=generator, device=device)
    # u < theta (probability theta) -> dropped; theta=0 keeps everything, theta=1 drops everything
    mask = (u >= theta).to(torch.float32 if dtype is None else dtype)
    return mask


@register_notrace_function
def sample_mask_like(ref: torch.Tensor, theta: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Drop mask for the feature ``ref`` ([B, C, M, N]): one draw per cell, on ``ref``'s device, in its dtype."""
    return sample_drop_mask(ref.shape[0], ref.shape[2], ref.shape[3], theta, generator, ref.device, ref.dtype)


@register_notrace_function
def noise_like(ref: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise of ``ref``'s shape, device and dtype."""
    noise = torch.randn(ref.shape, generator=generator, device=ref.device)
    return noise.to(ref.dtype)


def upsample_mask(mask: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of the cell mask ``[B, 1, M, N]`` to ``size`` (paper eq. 2, ``U_{i-1}``; the
    code's ``resize_nearest_neighbor``). The one mask upsampler of the project (repair blocks, kept-cell loss,
    figures)."""
    return F.interpolate(mask, size=size, mode='nearest')


def _resize_mask(mask: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The drop mask at ``ref``'s spatial size."""
    return upsample_mask(mask, (ref.shape[-2], ref.shape[-1]))


@register_notrace_function  # reason: branches on the layout (fx wraps only public names: no leading _)
def mask_in_layout_of(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``mask`` [B, 1, H, W] with channels-last strides when ``x`` is channels-last. A one-channel tensor is
    contiguous in both layouts, but ``torch.cat([x, mask], 1)`` keeps channels-last only if ``mask``'s strides say
    so; otherwise the concatenation comes out NCHW and the next convolution copies it back."""
    if x.dim() != 4 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return mask
    return mask.clone(memory_format=torch.channels_last)  # strides (H*W, 1, W, 1)


# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------

def norm_act_factory(
        norm_layer: Optional[LayerType] = None,
        act_layer: Optional[LayerType] = None,
        leak: float = 0.1,
        bn_momentum: float = 0.025,
        bn_eps: float = 1e-3,
) -> Callable[..., nn.Module]:
    """The norm + act layer of every generator block, as a timm norm-act factory (``factory(num_features)``).

    Default: the paper's BatchNorm (TF decay 0.975 -> ``momentum=0.025``, ``eps=1e-3``) then LeakyReLU(``leak``), one
    timm ``BatchNormAct2d``: a ``BatchNorm2d`` subclass whose activation is a parameterless child, so the state-dict
    keys are those of a plain ``BatchNorm2d``. Its activation is out of place, as before (an in-place LeakyReLU has
    no backward for ``leak <= 0``). ``norm_layer`` / ``act_layer`` (timm name, class or partial) replace the defaults;
    ``bn_momentum`` / ``bn_eps`` only apply to the default norm, ``leak`` only to the default activation.
    """
    if norm_layer is None:
        norm_layer = partial(BatchNormAct2d, momentum=bn_momentum, eps=bn_eps, inplace=False)
    if act_layer is None:
        act_layer = partial(nn.LeakyReLU, negative_slope=leak)
    return get_norm_act_layer(norm_layer, act_layer)


class ResizeConv(ConvNormAct):
    """Decoder layer D_i: bilinear 2x upsampling -> 3x3 'SAME' conv -> BatchNorm -> LeakyReLU (``up_conv2d``).

    timm's ``ConvNormAct`` (``.conv``, ``.bn`` = norm + act) with an upsampling first; the encoder layers are plain
    ``ConvNormAct``. ``create_conv2d(padding='same')`` gives ``nn.Conv2d`` with static padding where TF 'SAME' is
    symmetric (3x3/1) and ``Conv2dSame`` (asymmetric, as TF) otherwise (2x2/2, 3x3/2).
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            norm_act_layer: Optional[LayerType] = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__(
            in_chs, out_chs, 3, stride=1, padding='same', bias=False,
            norm_layer=norm_act_layer or norm_act_factory(), act_layer=None, device=device, dtype=dtype)
        # NOTE TF1's tf.image.resize_images(BILINEAR) (legacy, align_corners=False, no half-pixel centres) samples
        # the input half a pixel off compared with PyTorch's align_corners=False (half-pixel centres)
        self.up = nn.Upsample(scale_factor=2., mode='bilinear', align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.up(x)))


class RepairBlock(nn.Module):
    """Gated residual repair block R_i (paper Fig. 5, code ``layers.repair_res_layer``).

    ``out = x + (1 - mask) * conv2(bn1(conv1(cat([pre(x), mask]))))`` with ``bn1`` and ``pre`` BatchNorm + LeakyReLU
    (``pre`` is ``nn.Identity`` for the first block, which acts on the damaged feature directly). With ``gate=True``
    entries where ``mask == 1`` (kept) are returned unchanged, bit for bit; ``gate=False`` is ablation (i).
    ``mask`` must already be at ``x``'s resolution (``[B, 1, H, W]``).

    The layers are timm's ``create_conv2d`` and norm + act layers, but not ``ConvNormAct``: that would rename
    ``conv1.weight`` / ``bn1.*`` to ``conv1.conv.weight`` / ``conv1.bn.*`` and break the released weights. For the
    same reason ``pre`` stays a ``Sequential`` holding one ``bn`` (keys ``pre.bn.*``).
    """

    def __init__(
            self,
            channels: int,
            preact: bool = True,
            gate: bool = True,
            norm_act_layer: Optional[LayerType] = None,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        norm_act_layer = get_norm_act_layer(norm_act_layer or norm_act_factory())
        self.gate = gate
        self.pre = nn.Sequential(OrderedDict([('bn', norm_act_layer(channels, **dd))])) if preact else nn.Identity()
        self.conv1 = create_conv2d(channels + 1, channels, 3, stride=1, padding='same', bias=False, **dd)
        self.bn1 = norm_act_layer(channels, **dd)
        self.conv2 = create_conv2d(channels, channels, 3, stride=1, padding='same', bias=True, **dd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask_in_layout_of(mask.to(x.dtype), x)
        residual = self.conv1(torch.cat([self.pre(x), mask], dim=1))
        residual = self.conv2(self.bn1(residual))
        if self.gate:
            return x + (1. - mask) * residual
        return x + residual


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------

class DamageRepairGenerator(nn.Module):
    """Autoencoder {E, D} plus the damage & repair path {Omega * E, R_1, D_1, ..., R_{k+1}} of Jenni & Favaro 2018.

    Paper-named methods (images in [-1, 1]):

    * ``encode(x) -> phi`` ([B, widths[-1], H/2**k, W/2**k]), ``decode(phi) -> image``, ``autoencode(x)``;
    * ``sample_mask(batch_size, grid_size, theta=None, generator=None, device=None, dtype=None)`` -> Omega
      ``[B, 1, M, N]`` (1 = kept, 0 = dropped with probability ``theta``, default ``self.theta``);
    * ``damage(phi, mask, generator=None) -> phi_hat``;
    * ``repair_decode(phi_hat, mask) -> x_hat`` (repair blocks interleaved with the decoder layers);
    * ``damage_and_repair(x, mask=None, generator=None) -> (x_hat, mask)``;
    * ``autoencoder_parameters()`` (stage 1: E, D, to_rgb) and ``repair_parameters()`` (stage 2: R).

    timm API: ``forward_features(x)`` returns the generated image ``[B, in_chans, H, W]`` (train mode:
    ``damage_and_repair`` with a fresh mask, like dropout; eval mode: ``autoencode``, deterministic), so
    ``num_features == in_chans``; ``forward_head`` / ``forward`` apply a timm ``ClassifierHead`` (``num_classes=0``
    and ``global_pool=''`` return the images themselves). The default ``forward`` pools (``[B, in_chans]``) because
    timm's contract requires it: timm's model tests remove the classifier with ``reset_classifier(0)``, which keeps
    the pooling, and expect a 2-D ``[B, head_hidden_size]`` output, so a ``global_pool=''`` default fails them.
    ``feature_info`` lists the ``k + 1`` encoder outputs ``encoder.0`` .. ``encoder.k`` (reductions 1, 2, .., 2**k),
    used by ``features_only=True`` and ``forward_intermediates``. ``prune_intermediate_layers`` keeps the encoder up
    to the last wanted tap and (with the head) drops the decoder, repair network and ``to_rgb``; ``forward_features``
    then returns that encoder tap.
    Inputs must have ``in_chans`` channels and H, W multiples of ``2**k`` (ValueError otherwise).
    """

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 0,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            stem_width: int = 32,
            widths: Tuple[int, ...] = (64, 128, 256, 512),
            encoder_kernel_size: int = 2,
            leak: float = 0.1,
            theta: float = 0.7,
            fill: str = 'avg',
            repair: str = 'distributed',
            gate: bool = True,
            bn_momentum: float = 0.025,
            bn_eps: float = 1e-3,
            norm_layer: Optional[LayerType] = None,
            act_layer: Optional[LayerType] = None,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            in_chans: Image channels (input and generated output).
            num_classes: Classes of the timm head on the pooled generated image (0: no classifier).
            global_pool: timm global pooling of the head ('' keeps the image; the default pools, as timm's
                model contract asks of ``forward``).
            drop_rate: Dropout before the head's classifier.
            stem_width: Filters of the 3x3 stride-1 first encoder layer and of the last decoder layer (32).
            widths: Filters of the stride-2 encoder layers; ``k = len(widths)`` (paper: 64, 128, 256, 512).
            encoder_kernel_size: Kernel of the stride-2 encoder convs (2: paper, 18x18 receptive field;
                3: Table 1 ablation (h), 33x33).
            leak: Negative slope of the leaky ReLUs (paper 0.1).
            theta: Drop rate of the feature cells (0.7 for the released models, 0.5 in the ablation baseline).
            fill: Value of dropped cells, 'avg' (3x3 average of phi) or 'noise' (standard normal).
            repair: 'distributed' (paper), 'local' (ablation (b)) or 'none' (ablation (k)).
            gate: Gate the repair residuals with (1 - mask) (False: ablation (i)).
            bn_momentum: BatchNorm momentum (TF decay 0.975 -> 0.025).
            bn_eps: BatchNorm epsilon (TF 1e-3).
            norm_layer: Norm layer of E, D and R (default: BatchNorm with ``bn_momentum`` and ``bn_eps``; given one,
                those two are not applied). timm name, class or partial, mapped to its norm + act layer.
            act_layer: Activation after every norm (default: ``nn.LeakyReLU(leak)``; given one, ``leak`` is not
                applied). timm name, class or partial.
            device: Device of the parameters.
            dtype: Dtype of the parameters.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        widths = tuple(int(w) for w in widths)
        if len(widths) < 1:
            raise ValueError('widths must list at least one stride-2 encoder layer')
        if fill not in _FILL_TYPES:
            raise ValueError(f"fill must be one of {_FILL_TYPES}, got {fill!r}")
        if repair not in _REPAIR_TYPES:
            raise ValueError(f"repair must be one of {_REPAIR_TYPES}, got {repair!r}")
        if not 0. <= theta <= 1.:
            raise ValueError(f'theta (drop rate) must be in [0, 1], got {theta}')
        if encoder_kernel_size < 1:
            raise ValueError(f'encoder_kernel_size must be >= 1, got {encoder_kernel_size}')
        num_down = len(widths)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.theta = float(theta)
        self.fill = fill
        self.repair_mode = repair
        self.gate = gate
        self.encoder_stride = 2 ** num_down
        self.has_decoder = True  # False once prune_intermediate_layers() removed decoder / repair / to_rgb
        self.grad_checkpointing = False
        # one norm + act layer for every block of E, D and R (timm's BatchNormAct2d by default)
        norm_act_layer = norm_act_factory(norm_layer, act_layer, leak=leak, bn_momentum=bn_momentum, bn_eps=bn_eps)
        enc_kwargs = dict(padding='same', bias=False, norm_layer=norm_act_layer, act_layer=None, **dd)

        # E: encoder.0 = 3x3/1 stem, encoder.1..k = k x k/2 down layers (registered first: FeatureListNet relies
        # on the module order to stop after the encoder)
        self.feature_info: List[Dict[str, Any]] = [dict(num_chs=stem_width, reduction=1, module='encoder.0')]
        enc_layers: List[nn.Module] = [ConvNormAct(in_chans, stem_width, 3, 1, **enc_kwargs)]
        prev_chs = stem_width
        for i, w in enumerate(widths):
            enc_layers.append(ConvNormAct(prev_chs, w, encoder_kernel_size, 2, **enc_kwargs))
            self.feature_info.append(dict(num_chs=w, reduction=2 ** (i + 1), module=f'encoder.{i + 1}'))
            prev_chs = w
        self.encoder = nn.Sequential(*enc_layers)
        self.num_taps = len(self.feature_info)

        # D: k resize-convs, widths mirror the encoder (reversed(widths[:-1]) then stem_width), then to_rgb + tanh
        dec_widths = list(reversed(widths[:-1])) + [stem_width]
        dec_layers: List[nn.Module] = []
        for w in dec_widths:
            dec_layers.append(ResizeConv(prev_chs, w, norm_act_layer=norm_act_layer, **dd))
            prev_chs = w
        self.decoder = nn.Sequential(*dec_layers)
        self.to_rgb = create_conv2d(stem_width, in_chans, 3, stride=1, padding='same', bias=True, **dd)

        # R: k + 1 gated residual repair blocks
        if repair == 'distributed':
            repair_widths = [widths[-1]] + dec_widths
        elif repair == 'local':
            repair_widths = [widths[-1]] * (num_down + 1)
        else:
            repair_widths = []
        self.repair = nn.ModuleList([
            RepairBlock(w, preact=i > 0, gate=gate, norm_act_layer=norm_act_layer, **dd)
            for i, w in enumerate(repair_widths)
        ])

        self.num_features = in_chans  # forward_features returns the generated image
        self.head = ClassifierHead(
            self.num_features,
            num_classes,
            pool_type=global_pool,
            drop_rate=drop_rate,
            **dd,
        )
        self.head_hidden_size = self.head.num_features

        self._init_weights()

    def _init_weights(self) -> None:
        """TF-contrib ``variance_scaling_initializer(factor=2.0, mode='FAN_AVG')`` (the code's ``he``) for convs."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # truncated normal (at 2 std) with std sqrt(1.3 * 2 / fan_avg), as TF's non-uniform variance scaling
                receptive = m.weight[0][0].numel()
                fan_avg = 0.5 * (m.in_channels // m.groups + m.out_channels) * receptive
                std = math.sqrt(1.3 * 2.0 / fan_avg)
                nn.init.trunc_normal_(m.weight, mean=0., std=std, a=-2. * std, b=2. * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0., 0.01)
                nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------------------------
    # timm model API
    # ----------------------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups: encoder stem, encoder down layers, decoder (+ to_rgb), repair network."""
        return dict(
            stem=r'^encoder\.0\.',
            blocks=r'^encoder\.(\d+)',
            decoder=r'^decoder|^to_rgb' if coarse else [(r'^decoder\.(\d+)', None), (r'^to_rgb', (99999,))],
            repair=r'^repair' if coarse else r'^repair\.(\d+)',
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint every encoder / decoder layer and repair block (recomputed in backward)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (``num_classes=0``: none); ``global_pool=None`` keeps the current pooling."""
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, **dd)
        self.head_hidden_size = self.head.num_features

    @torch.jit.ignore
    def autoencoder_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the autoencoder {E, D, to_rgb}: what stage 1 trains (frozen in stage 2)."""
        return chain(self.encoder.parameters(), self.decoder.parameters(), self.to_rgb.parameters())

    @torch.jit.ignore
    def repair_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the repair network R: what stage 2 trains adversarially (empty for ``repair='none'``)."""
        return self.repair.parameters()

    @torch.jit.ignore
    def set_pretraining_stage(self, stage: int) -> 'DamageRepairGenerator':
        """Modes and trainable parameters of a pretraining stage (paper Sec. 4.5): stage 1 trains the autoencoder
        {E, D, to_rgb}; stage 2 freezes it (no gradients, BatchNorm on its running statistics) and trains R."""
        if stage not in (1, 2):
            raise ValueError(f'pretraining stage must be 1 or 2, got {stage!r}')
        self.requires_grad_(False)
        self.train()
        for p in self.autoencoder_parameters() if stage == 1 else self.repair_parameters():
            p.requires_grad_(True)
        if stage == 2:
            for frozen in (self.encoder, self.decoder, self.to_rgb):
                frozen.eval()
        return self

    # ----------------------------------------------------------------------------------------------------------
    # Paper components
    # ----------------------------------------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """E: image ``[B, in_chans, H, W]`` in [-1, 1] -> feature phi ``[B, widths[-1], H/2**k, W/2**k]``."""
        x = check_image_input(x, self.in_chans, self.encoder_stride)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.encoder, x)
        return self.encoder(x)

    def _to_image(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.to_rgb(x))

    def decode(self, phi: torch.Tensor) -> torch.Tensor:
        """D: feature phi -> image in [-1, 1] (the plain autoencoder path, no repair)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.decoder, phi)
        else:
            x = self.decoder(phi)
        return self._to_image(x)

    def autoencode(self, x: torch.Tensor) -> torch.Tensor:
        """D(E(x)): the 'real' examples of the discriminator."""
        return self.decode(self.encode(x))

    @torch.jit.ignore
    def sample_mask(
            self,
            batch_size: int,
            grid_size: Union[int, Tuple[int, int]],
            theta: Optional[float] = None,
            generator: Optional[torch.Generator] = None,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        """Drop mask Omega ``[batch_size, 1, M, N]`` (float, 1 = kept, 0 = dropped).

        Every cell (shared by all channels of phi) is dropped independently with probability ``theta``
        (the drop rate, default ``self.theta``). ``generator`` makes the draw reproducible.
        """
        if isinstance(grid_size, int):
            grid_size = (grid_size, grid_size)
        theta = self.theta if theta is None else float(theta)
        device = torch.device(device) if device is not None else None
        return sample_drop_mask(batch_size, grid_size[0], grid_size[1], theta, generator, device, dtype)

    def damage(
            self,
            phi: torch.Tensor,
            mask: torch.Tensor,
            generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """phi_hat = mask * phi + (1 - mask) * fill; kept cells (mask == 1) are left untouched.

        ``fill='avg'``: 3x3, stride 1 'SAME' average pool of phi (TF excludes the padding at the borders);
        ``fill='noise'``: standard normal noise (``generator`` makes it reproducible).
        """
        mask = check_drop_mask(mask, phi)
        if self.fill == 'noise':
            fill = noise_like(phi, generator)
        else:
            fill = F.avg_pool2d(phi, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return mask * phi + (1. - mask) * fill

    def repair_decode(self, phi_hat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """D_hat = {R_1, D_1, R_2, ..., D_k, R_{k+1}} (Eqs. 1-2): damaged feature + mask -> corrupt image in [-1, 1].

        ``repair='distributed'`` (the paper), with Omega_j the drop mask nearest-neighbour upsampled to the
        resolution after D_j (Omega_0 = Omega)::

            x_0 = phi_hat
            x_j = D_j(R_j(x_{j-1}, Omega_{j-1}))    for j = 1 .. k
            x_hat = tanh(to_rgb(R_{k+1}(x_k, Omega_k)))

        ``repair='local'``: x_hat = D(R_{k+1}(... R_1(phi_hat, Omega) ..., Omega)); ``repair='none'``: D(phi_hat).
        """
        mask = check_drop_mask(mask, phi_hat)
        x = phi_hat
        if self.repair_mode != 'distributed':
            for r_i in self.repair:  # 'local': every R before D; 'none': no R
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(r_i, x, mask)
                else:
                    x = r_i(x, mask)
            return self.decode(x)

        for r_j, d_j in zip(self.repair, self.decoder):  # R_1, D_1, ..., R_k, D_k
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(r_j, x, _resize_mask(mask, x))
                x = checkpoint(d_j, x)
            else:
                x = d_j(r_j(x, _resize_mask(mask, x)))
        # R_{k+1}, the one block after the last decoder layer (TorchScript cannot index a ModuleList with a variable
        # or call the blocks of a slice of one, so it is found by position)
        for i, r_last in enumerate(self.repair):
            if i == len(self.decoder):
                if self.grad_checkpointing and not torch.jit.is_scripting():
                    x = checkpoint(r_last, x, _resize_mask(mask, x))
                else:
                    x = r_last(x, _resize_mask(mask, x))
        return self._to_image(x)

    def damage_and_repair(
            self,
            x: torch.Tensor,
            mask: Optional[torch.Tensor] = None,
            generator: Optional[torch.Generator] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Corrupt image x_hat = D_hat(damage(E(x), mask), mask) and the mask used (sampled if None)."""
        phi = self.encode(x)
        if mask is None:
            mask = sample_mask_like(phi, self.theta, generator)
        mask = check_drop_mask(mask, phi)
        x_hat = self.repair_decode(self.damage(phi, mask, generator), mask)
        return x_hat, mask

    def _generate(self, phi: torch.Tensor) -> torch.Tensor:
        """Image from phi: train mode damage & repair with a fresh mask, eval mode the plain decoder."""
        if self.training:
            mask = sample_mask_like(phi, self.theta, None)
            return self.repair_decode(self.damage(phi, mask), mask)
        return self.decode(phi)

    # ----------------------------------------------------------------------------------------------------------
    # timm forward API
    # ----------------------------------------------------------------------------------------------------------

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Encoder outputs (``encoder.0`` .. ``encoder.k``) and the generated image.

        Args:
            x: Input images ``[B, in_chans, H, W]`` in [-1, 1].
            indices: Take last n encoder outputs if int, all if None, select matching indices if sequence.
            norm: Unused (no final norm).
            stop_early: Stop after the last wanted encoder layer; the returned final tensor is then that encoder
                output, except when the last encoder layer is wanted (the generator then runs as usual).
            output_fmt: Only 'NCHW'.
            intermediates_only: Return the intermediates only.

        Returns:
            ``(forward_features(x), intermediates)`` or just the intermediates.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        x = check_image_input(x, self.in_chans, self.encoder_stride)
        intermediates: List[torch.Tensor] = []
        num_taps = self.num_taps
        take_indices, max_index = feature_take_indices(num_taps, indices)

        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            layers = self.encoder
        else:
            layers = self.encoder[:max_index + 1]
        for i, layer in enumerate(layers):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(layer, x)
            else:
                x = layer(x)
            if i in take_indices:
                intermediates.append(x)

        if intermediates_only:
            return intermediates

        if self.has_decoder and (not stop_early or max_index == num_taps - 1):
            x = self._generate(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Keep the encoder up to the last wanted tap; with the head (or when the encoder is cut) also drop the
        decoder, repair network and to_rgb: ``forward_features`` then returns the last kept encoder output.

        Args:
            indices: Indices of the encoder outputs to keep.
            prune_norm: Unused (no final norm).
            prune_head: Drop the head (and the generator decoder, which acts as the model's neck).

        Returns:
            List of indices that were kept.
        """
        num_taps = self.num_taps
        take_indices, max_index = feature_take_indices(num_taps, indices)
        prune_end = max_index < num_taps - 1
        self.encoder = self.encoder[:max_index + 1]
        self.encoder_stride = self.feature_info[max_index]['reduction']
        if prune_head or prune_end:
            self.decoder = nn.Sequential()
            self.repair = nn.ModuleList()
            self.to_rgb = nn.Identity()
            self.has_decoder = False
            self.num_features = self.feature_info[max_index]['num_chs']
            self.head = ClassifierHead(
                self.num_features,
                0,
                pool_type='',
                drop_rate=self.head.drop.p,
                **get_device_dtype(self),
            )
            self.head.train(self.training)
            self.head_hidden_size = self.head.num_features
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Generated image ``[B, in_chans, H, W]`` in [-1, 1]: damage & repair (train) or autoencoded (eval)."""
        phi = self.encode(x)
        if not self.has_decoder:
            return phi
        return self._generate(phi)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Adapt the output conv (``to_rgb``) of RGB weights to a model built with another ``in_chans``.

    timm adapts the first conv (``encoder.0.conv``) to ``in_chans``; this image-to-image model also has ``in_chans``
    outputs. A 1-channel model gets the mean of the R, G, B output filters (a gray output, before tanh); other
    counts repeat R, G, B cyclically. Weights stored in bfloat16 (the release) are upcast to float32 first, so
    timm's input-conv adaptation is computed in float32.
    """
    target = model.state_dict()
    out = upcast_state_dict(state_dict)
    for key in ('to_rgb.weight', 'to_rgb.bias'):
        if key not in out or key not in target or out[key].shape == target[key].shape:
            continue
        src, want = out[key].float(), target[key].shape[0]
        if src.shape[1:] != target[key].shape[1:]:
            continue  # another architecture: let the strict load report it
        out[key] = src.mean(dim=0, keepdim=True) if want == 1 else src[[i % src.shape[0] for i in range(want)]]
    return out


def _create_damage_repair_generator(variant: str, pretrained: bool = False, **kwargs: Any) -> DamageRepairGenerator:
    """Build through timm's ``build_model_with_cfg`` (pretrained cfg, features_only, strict weight loading).

    ``build_spot_model`` re-raises weight-loading failures (nothing published on the Hub, offline, keys that do not
    match) as RuntimeErrors naming the source and suggesting ``pretrained_cfg_overlay=dict(file=...)``.
    """
    # all encoder outputs (stem + one per stride-2 layer): (0, 1, 2, 3, 4) for the paper's k = 4
    num_taps = len(kwargs.get('widths', (64, 128, 256, 512))) + 1
    return build_spot_model(
        DamageRepairGenerator,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(num_taps))),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 0,
        'input_size': (3, 128, 128),
        'pool_size': (128, 128),
        'crop_pct': 0.85,
        'interpolation': 'bicubic',
        'mean': (0.5, 0.5, 0.5),  # the generator works on images in [-1, 1]
        'std': (0.5, 0.5, 0.5),
        'first_conv': 'encoder.0.conv',
        'classifier': 'head.fc',
        **PAPER_CFG,
        **kwargs,
    }


# pretrained tags from ._releases; without a release row: the paper's untagged 128-px cfg, no weights
default_cfgs = generate_default_cfgs(release_cfgs(
    'damage_repair_generator', _cfg, lambda size: dict(pool_size=(size, size))))


@register_model
def damage_repair_generator(pretrained: bool = False, **kwargs: Any) -> DamageRepairGenerator:
    """Damage & repair generator (paper: k = 4, widths 64-128-256-512, 2x2 encoder convs, theta 0.7)."""
    return _create_damage_repair_generator('damage_repair_generator', pretrained, **kwargs)

"""Pretext discriminator C of "Learning to Spot Artifacts" (``alexnet_spot_discriminator``).

Paper: Jenni & Favaro, CVPR 2018, https://arxiv.org/abs/1806.05024 (Sec. 4.3, 4.4); authors' code
models/AlexNet.py and models/SpotNet.py.

The trunk is exactly ``alexnet_spot``'s (same module names, ``features.conv1`` .. ``features.conv5``) plus the
pretext-only BatchNorm after conv5. Two heads sit on the conv5 map: the real/corrupt head (fc6 as a convolution
spanning the conv5 map, ``head_kernel_size`` = image size / 16, then one logit, > 0 = real; timm's ``head``, what
``forward`` returns) and the mask head (3x3 conv to one channel on the drop-mask grid; positive where C thinks the
cell was kept).

Input: ``forward``/``forward_features`` take timm-normalised images (as ``alexnet_spot``); ``forward_pretext``
takes the pretraining code's [-1, 1] images and applies the authors' normalisation itself.

timm conformance note: ``forward`` only uses the real/corrupt head, so in timm's generic backward test the
mask head receives no gradient by design; ``forward_pretext`` uses both heads (tests/test_alexnet_spot.py).

The architecture, the paper vs the authors' code and the choices made here: docs/method.md.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model, resolve_pretrained_cfg

from ._spot_builder import build_spot_model, upcast_state_dict
from ._releases import release_cfgs
from .alexnet_spot import SPOT_MEAN, AlexNetSpot, checkpoint_filter_fn
from .alexnet_spot import _cfg as _backbone_cfg

__all__ = ['AlexNetSpotDiscriminator']


class AlexNetSpotDiscriminator(AlexNetSpot):
    """AlexNet trunk with BatchNorm after conv5, a real/corrupt head and a drop-mask head."""

    def __init__(
            self,
            num_classes: int = 1,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            head_kernel_size: int = 8,
            head_hidden_size: int = 4096,
            head_drop_rate: float = 0.5,
            mask_head: bool = True,
            bias_init: float = 0.1,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            num_classes: outputs of the real/corrupt head (1 logit: > 0 means real).
            in_chans: input channels.
            global_pool: pooling after fc6 (only matters for images larger than ``head_kernel_size`` * 16).
            drop_rate: dropout before the final logit layer.
            head_kernel_size: fc6 kernel in conv5 cells; set to image size / 16 so fc6 spans the whole map.
            head_hidden_size: fc6 width (4096).
            head_drop_rate: dropout after fc6 (0.5).
            mask_head: build the drop-mask head (False = Table 1 ablation (g), no mask prediction).
            bias_init: initial conv bias (0.1, as the authors' code).
        """
        super().__init__(
            num_classes=num_classes,
            in_chans=in_chans,
            global_pool=global_pool,
            drop_rate=drop_rate,
            head_type='fc',
            fc_hidden_size=head_hidden_size,
            fc_kernel_size=head_kernel_size,
            fc_drop_rate=head_drop_rate,
            fc_layers=1,
            norm5=True,
            bias_init=bias_init,
            device=device,
            dtype=dtype,
        )
        dd = {'device': device, 'dtype': dtype}
        self.mask_head = nn.Conv2d(self.num_features, 1, 3, padding=1, **dd) if mask_head else None
        if self.mask_head is not None:
            nn.init.xavier_uniform_(self.mask_head.weight)
            nn.init.constant_(self.mask_head.bias, bias_init)
        # the authors' input normalisation for [-1, 1] images: 0..255 minus RGB means (non-persistent: no weights)
        mean255 = torch.tensor([m * 255.0 for m in SPOT_MEAN], **dd).reshape(1, 3, 1, 1)
        self.register_buffer('pixel_mean', mean255, persistent=False)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^features\.conv1',
            blocks=[(r'^features\.(?:conv|norm)(\d+)', None), (r'^(?:pre_logits|mask_head)', (99999,))],
        )

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if prune_head or self.num_features != 256:
            self.mask_head = None  # a pretext head: goes with the classifier
        return take_indices

    @torch.jit.ignore
    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the authors' input (0..255 minus the RGB means) = timm-normalised input."""
        if x.shape[1] != 3:
            raise ValueError(f'the pretext input normalisation is for RGB images, got {x.shape[1]} channels')
        return (x + 1.0) * 127.5 - self.pixel_mean.to(x.dtype)

    @torch.jit.ignore
    def forward_mask(self, features: torch.Tensor) -> torch.Tensor:
        """Drop-mask logits [B, 1, H/16, W/16] from conv5 features (> 0: cell kept, < 0: artifact)."""
        if self.mask_head is None:
            raise RuntimeError('this discriminator was built without a mask head (mask_head=False or pruned)')
        return self.mask_head(features)

    @torch.jit.ignore
    def forward_pretext(self, x: torch.Tensor, normalize: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The pretext outputs for images in [-1, 1]: (real logit [B], mask logits [B, 1, H/16, W/16] or None).

        Args:
            x: images in [-1, 1] (real = autoencoded, or damaged-and-repaired).
            normalize: apply the authors' input normalisation (False if ``x`` is already timm-normalised).
        """
        if normalize:
            x = self.normalize_input(x)
        features = self.forward_features(x)
        logits = self.forward_head(features)
        real_logit = logits[:, 0] if logits.ndim == 2 else logits.flatten(1)[:, 0]
        mask_logits = self.mask_head(features) if self.mask_head is not None else None
        return real_logit, mask_logits

    @torch.jit.ignore
    def backbone_state_dict(self, fold_norm: bool = True) -> Dict[str, torch.Tensor]:
        """Trunk weights for ``alexnet_spot``: BN folded into conv5 (default) or kept for ``norm5=True``."""
        target = AlexNetSpot(num_classes=0, norm5=not fold_norm, device='meta')
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        return {k: v.contiguous() for k, v in checkpoint_filter_fn(state, target).items()}


def _create_discriminator(variant: str, pretrained: bool = False, **kwargs: Any) -> AlexNetSpotDiscriminator:
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3, 4))
    if 'head_kernel_size' not in kwargs:
        # fc6 spans the whole conv5 map of the image size the weights were trained at (the pretrained tag's)
        cfg = resolve_pretrained_cfg(
            variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        kwargs['head_kernel_size'] = max(1, cfg.input_size[-1] // 16)
    return build_spot_model(
        AlexNetSpotDiscriminator,
        variant,
        pretrained,
        pretrained_filter_fn=lambda sd, model: upcast_state_dict(sd),  # bfloat16 release -> float32 before adapting
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    # the backbone's cfg (same trunk, input normalisation, first conv, classifier name) with one real/corrupt logit
    return _backbone_cfg(**{'num_classes': 1, **kwargs})


# pretrained tags from ._releases (fc6 spans the conv5 map of the tag's input size: head_kernel_size follows it);
# without a release row: the paper's untagged 128-px cfg, no weights
default_cfgs = generate_default_cfgs(release_cfgs(
    'alexnet_spot_discriminator', _cfg, lambda size: dict(pool_size=(-(-size // 16), -(-size // 16)))))


@register_model
def alexnet_spot_discriminator(pretrained: bool = False, **kwargs: Any) -> AlexNetSpotDiscriminator:
    """Pretext discriminator: AlexNet + BN(conv5), real/corrupt head and drop-mask head."""
    return _create_discriminator('alexnet_spot_discriminator', pretrained=pretrained, **kwargs)

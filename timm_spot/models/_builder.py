"""Thin wrapper over timm's ``build_model_with_cfg`` that turns weight-loading failures into clear errors.

timm already resolves pretrained sources (``hf_hub_id``, ``pretrained_cfg_overlay=dict(file=...)``) and
loads them strictly; this only re-raises its failures with the model, the source and the fix in the
message, so a user never has to decode a Hub 404 or a bare safetensors header error.
"""
from typing import Any, Callable, Optional, Type

import torch.nn as nn
from timm.models import build_model_with_cfg
from timm.models._registry import get_pretrained_cfg

__all__ = ['PAPER_CFG', 'build_spot_model']

# pretrained-cfg fields shared by every model of the paper
PAPER_CFG = {
    'license': 'mit',
    'paper_ids': 'arXiv:1806.05024',
    'paper_name': 'Self-Supervised Feature Learning by Learning to Spot Artifacts',
    'origin_url': 'https://github.com/sjenni/LearningToSpotArtifacts',
}


def _weights_source(variant: str, overlay: Optional[dict], pretrained_cfg: Any = None) -> str:
    overlay = overlay or {}
    if overlay.get('file'):
        return f"file {overlay['file']!r}"
    if overlay.get('state_dict') is not None:
        return 'the given state_dict'
    # the cfg timm will use: a dict (from an hf-hub:/local-dir: config.json, or passed in), else the registry's
    if isinstance(pretrained_cfg, dict):
        cfg = pretrained_cfg
    else:
        tagged = f'{variant}.{pretrained_cfg}' if isinstance(pretrained_cfg, str) else variant
        registry_cfg = get_pretrained_cfg(tagged)
        cfg = registry_cfg.to_dict() if registry_cfg is not None else {}
    if cfg.get('source') == 'local-dir':
        return f"local folder {cfg.get('file')!r}"
    hub_id = overlay.get('hf_hub_id') or cfg.get('hf_hub_id')
    return f'Hugging Face Hub repo {hub_id!r}' if hub_id else 'no source'


def build_spot_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool,
        pretrained_filter_fn: Optional[Callable] = None,
        **kwargs: Any,
) -> nn.Module:
    """``build_model_with_cfg`` with errors that name the weights source and the problem."""
    if not pretrained:
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn, **kwargs)
    source = _weights_source(variant, kwargs.get('pretrained_cfg_overlay'), kwargs.get('pretrained_cfg'))
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn, **kwargs)
    except TypeError:
        raise  # an unknown constructor argument: timm's own message is already precise
    except RuntimeError as e:
        if 'state_dict' in str(e) or 'size mismatch' in str(e):
            raise RuntimeError(
                f'weights from {source} do not match {variant}: {e}\n'
                f'(was the file exported from a different model or with other constructor arguments?)'
            ) from e
        raise RuntimeError(f'could not load pretrained weights for {variant} from {source}: {e}') from e
    except Exception as e:  # hub errors (offline, 404, gated), truncated/corrupt safetensors, missing file
        hint = ''
        if source.startswith('Hugging Face'):
            hint = (
                '\nIf the weights are not published (or this machine is offline), load a local file with '
                "timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file='model.safetensors'))."
            )
        raise RuntimeError(
            f'could not load pretrained weights for {variant} from {source}: {type(e).__name__}: {e}{hint}'
        ) from e

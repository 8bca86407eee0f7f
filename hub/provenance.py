"""What an export is checked against and stamped with: the model registry (``registry_report``: can
``timm.create_model(name, pretrained=True)`` load these weights, and build the same model?) and the commit of this
checkout (``git_revision``)."""
from __future__ import annotations

import inspect
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional, Sequence


def _import_models() -> None:
    import timm_spot  # noqa: F401  (registers the models with timm)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def registry_report(name: str, model_args: Dict[str, Any], shapes: Dict[str, Sequence[int]],
                    tag: Optional[str] = None, img_size: Optional[int] = None) -> Dict[str, Any]:
    """Compare exported weights and constructor args with what the registry builds for ``name``.

    ``timm.create_model(name, pretrained=True)`` builds the model from the registered defaults (it does not read
    config.json's ``model_args``), so it can load the weights only when every tensor shape matches
    (``loadable``), and reproduces the trained model only when no constructor argument differs
    (``equivalent``). ``hf-hub:<repo>`` names read ``model_args`` and work either way. A tag not in the release
    table yet is compared with the cfg its row will give (``img_size``, default 128).
    """
    import timm
    from timm.models import get_model_args
    _import_models()
    if tag and not _is_registered(name, tag):
        from timm_spot.models._releases import release_cfg
        ref = timm.create_model(name, pretrained_cfg=release_cfg(name, tag, img_size or 128), device='meta')
    else:
        ref = timm.create_model(f'{name}.{tag}' if tag else name, device='meta')  # the tag's cfg may set args
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    shapes = {k: tuple(v) for k, v in shapes.items()}
    mismatches = sorted(
        f'{k}: exported {shapes.get(k, "missing")} vs registry {ref_shapes.get(k, "missing")}'
        for k in set(ref_shapes) | set(shapes) if ref_shapes.get(k) != shapes.get(k)
    )
    defaults = {k: p.default for k, p in inspect.signature(type(ref).__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    defaults.update(get_model_args(ref))  # in_chans / num_classes / global_pool as the registry cfg sets them
    # constructor args an entrypoint derives from the pretrained tag (e.g. the discriminator's fc6 kernel)
    derived = {'head_kernel_size': getattr(getattr(ref, 'pre_logits', None), 'kernel_size', None)}
    defaults.update({k: v for k, v in derived.items() if v is not None and k in defaults})
    nondefault = {}
    for k, v in model_args.items():
        if k in defaults and _jsonable(defaults[k]) != _jsonable(v):
            nondefault[k] = {'exported': _jsonable(v), 'registry': _jsonable(defaults[k])}
    return dict(loadable=not mismatches, equivalent=not mismatches and not nondefault,
                shape_mismatches=mismatches, nondefault_args=nondefault)


def git_revision() -> Optional[str]:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ('-dirty' if dirty.stdout.strip() else '')
    except (OSError, subprocess.SubprocessError):
        return None


def _is_registered(name: str, tag: str) -> bool:
    import timm
    _import_models()
    return f'{name}.{tag}' in timm.list_models(name, include_tags=True)

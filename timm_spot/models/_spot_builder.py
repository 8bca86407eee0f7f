"""Thin wrapper over timm's ``build_model_with_cfg`` that turns weight-loading failures into clear errors.

timm already resolves pretrained sources (``hf_hub_id``, ``pretrained_cfg_overlay=dict(file=...)``) and
loads them strictly; this only re-raises its failures with the model, the source and the fix in the
message, so a user never has to decode a Hub 404 or a bare safetensors header error. Two failures are raised
before timm is asked at all:

* ``pretrained=True`` for a model or tag without weights (timm would only warn and return random weights);
* a Hub repo that is not in the local Hugging Face cache while the machine is known to be offline
  (``HF_HUB_OFFLINE`` set, or the Hub's host cannot be reached within a second): huggingface_hub would retry
  for about 50 s first. The message names the repo and tag, says whether the tag's weights are published, and
  gives the offline routes (the shipped folder via ``local-dir:``, a cache seeded by ``python -m hub cache
  --all``, ``pretrained_cfg_overlay=dict(file=...)``).
"""
import os
import socket
from typing import Any, Callable, Optional, Tuple, Type
from urllib.parse import urlparse

import torch.nn as nn
from timm.models import build_model_with_cfg, get_pretrained_cfg, resolve_pretrained_cfg
# private: timm's own resolution of a pretrained cfg to (load_from, location); no public name exists
from timm.models._builder import _resolve_pretrained_source

from ._releases import RELEASES, find_release, releases

__all__ = ['PAPER_CFG', 'build_spot_model', 'upcast_state_dict', 'hub_offline_reason', 'offline_routes']

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


_TRUE = ('1', 'on', 'yes', 'true')
_CONNECT_TIMEOUT_S = 1.0
_reachable: dict = {}  # host -> bool, one check per process


def hub_offline_reason() -> Optional[str]:
    """Why the Hugging Face Hub cannot be reached from here (None: it may be reachable).

    ``HF_HUB_OFFLINE`` (the environment or huggingface_hub's constant); else one TCP connection attempt to the
    Hub's host with a 1 s timeout, remembered for the process. Behind a proxy (``HTTPS_PROXY``...) no check is
    made: the direct connection says nothing about the proxy.
    """
    try:
        from huggingface_hub import constants
        if getattr(constants, 'HF_HUB_OFFLINE', False):
            return 'HF_HUB_OFFLINE is set'
        endpoint = getattr(constants, 'ENDPOINT', 'https://huggingface.co')
    except ImportError:
        return 'huggingface_hub is not installed'
    if os.environ.get('HF_HUB_OFFLINE', '').strip().lower() in _TRUE:
        return 'HF_HUB_OFFLINE is set'
    if any(os.environ.get(v) for v in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy')):
        return None
    url = urlparse(endpoint)
    host, port = url.hostname or 'huggingface.co', url.port or (80 if url.scheme == 'http' else 443)
    if host not in _reachable:
        try:
            socket.create_connection((host, port), timeout=_CONNECT_TIMEOUT_S).close()
            _reachable[host] = True
        except OSError:
            _reachable[host] = False
    return None if _reachable[host] else f'{host} cannot be reached'


def _in_hf_cache(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    repo, _, revision = hub_id.partition('@')
    for filename in ('model.safetensors', 'pytorch_model.bin', 'open_clip_pytorch_model.bin'):
        try:
            if isinstance(try_to_load_from_cache(repo, filename, revision=revision or None), str):
                return True
        except Exception:  # a malformed repo id: let timm / huggingface_hub report it
            return True
    return False


def offline_routes(model: str, tag: Optional[str], hub_id: Optional[str] = None) -> str:
    """Whether ``model.tag`` is published, and how to load it without the Hub (lines of a message)."""
    rel = find_release(model, tag) if tag is not None else None
    repo = (hub_id or '').split('@')[0]
    if rel is not None and repo in ('', rel.repo_id):
        folder = f'hub/{rel.name}'
        state = (f'{rel.repo_id} is published on the Hub' if rel.published else
                 f'{rel.repo_id} is not published on the Hub yet')
        # the routes a pip (wheel) user has come first: hub/ is in the repository, not in the wheel
        get = ('download its four files once (`hf download ' + rel.repo_id + ' --local-dir DIR`)' if rel.published
               else 'copy the folder ' + folder + '/ (four files) from the timm-spot repository to DIR')
        return (
            f'{state}; its weights ship with the timm-spot repository in {folder}/. Routes:\n'
            f"  timm.create_model('hf-hub:{rel.repo_id}', pretrained=True)   # online, once published\n"
            f"  timm.create_model('local-dir:DIR', pretrained=True)   # without a checkout: {get}\n"
            f"  timm.create_model('{rel.name}', pretrained=True, pretrained_cfg_overlay=dict(file='DIR/model.safetensors'))\n"
            f'In a timm-spot checkout (repository root):\n'
            f"  timm.create_model('local-dir:{folder}', pretrained=True)\n"
            f'  python -m hub cache --all --cache-dir DIR   # seeds a Hugging Face cache with every shipped release;\n'
            f"      then HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1 and timm.create_model('{rel.name}', pretrained=True)\n"
            f"  timm.create_model('{rel.name}', pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='{folder}/model.safetensors'))")
    shipped = ', '.join(r.name for r in RELEASES) or 'none'
    return (
        f'{repo or model} is not a timm-spot release (released: {shipped}). Offline routes: '
        f"timm.create_model('local-dir:<folder with config.json and model.safetensors>', pretrained=True), "
        f'a Hugging Face cache holding the repo (HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1), or '
        f"timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file='model.safetensors')).")


def _check_local_dir_architecture(variant: str, folder: Any) -> None:
    """A ``local-dir:`` folder whose config.json names another architecture than its weights (safetensors
    metadata written by ``python -m hub export``) fails deep inside timm with an unrelated AttributeError: name both."""
    import json
    import os
    import struct
    path = os.path.join(str(folder), 'model.safetensors')
    try:
        with open(path, 'rb') as f:
            (n,) = struct.unpack('<Q', f.read(8))
            meta = json.loads(f.read(min(n, 100 << 20)).decode('utf-8')).get('__metadata__') or {}
    except (OSError, ValueError, struct.error):
        return  # timm's own loading names a missing or unreadable file
    arch = meta.get('architecture')
    if arch and arch != variant:
        raise RuntimeError(f'local folder {folder}: config.json names architecture {variant!r} but model.safetensors '
                           f'holds {arch!r} weights; fix "architecture" in config.json (or load the {variant} folder)')


def _check_source(variant: str, kwargs: dict) -> Tuple[str, Any]:
    """(load_from, location) timm will use; raises early for no weights, or an uncached repo while offline."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    load_from, loc = _resolve_pretrained_source(cfg.to_dict())
    tag = cfg.tag or None
    name = f'{variant}.{tag}' if tag else variant
    if not load_from:
        shipped = [r.name for r in releases(variant)]
        raise RuntimeError(
            f'{name} has no pretrained weights: '
            + (f'the released tags of {variant} are {", ".join(shipped)}' if shipped else
               f'no release of it ships yet (released: {", ".join(r.name for r in RELEASES) or "none"})')
            + '. Train them with train_scripts/pretrain.py and load the run\'s file with '
              f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='"
              f"{variant}.safetensors')), or pass pretrained=False for random init.")
    if load_from == 'local-dir':
        _check_local_dir_architecture(variant, loc)
    if load_from == 'hf-hub':
        hub_id = loc[0] if isinstance(loc, tuple) else loc
        if not _in_hf_cache(hub_id):
            reason = hub_offline_reason()
            if reason:
                raise RuntimeError(
                    f'could not load pretrained weights for {name}: Hugging Face Hub repo {hub_id!r} is not in the '
                    f'local cache and the Hub cannot be reached ({reason}).\n'
                    + offline_routes(variant, tag, hub_id))
    return load_from, loc


def upcast_state_dict(state_dict: dict) -> dict:
    """bfloat16 / float16 tensors as float32 (exact): the pretext releases are stored in bfloat16, and timm's
    in_chans adaptation would otherwise sum the first conv in the stored precision."""
    import torch
    return {k: v.float() if isinstance(v, torch.Tensor) and v.dtype in (torch.bfloat16, torch.float16) else v
            for k, v in state_dict.items()}


def verify_release_file(variant: str, kwargs: dict, loc: Any) -> None:
    """A release loaded from a Hub cache must be the file the release table names (``Release.sha256``): a
    corrupted or swapped cached model.safetensors otherwise loads silently. No-op for releases without a hash and
    for other sources (local files, other repos)."""
    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                 pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    rel = find_release(variant, cfg.tag) if cfg.tag else None
    if rel is None or not rel.sha256:
        return
    hub_id = loc[0] if isinstance(loc, tuple) else loc
    repo, _, revision = str(hub_id).partition('@')
    if repo != rel.repo_id:
        return
    from huggingface_hub import try_to_load_from_cache
    from timm.models._hub import HF_SAFE_WEIGHTS_NAME
    path = try_to_load_from_cache(repo, HF_SAFE_WEIGHTS_NAME, revision=revision or None)
    if not isinstance(path, str):
        return
    from timm_spot.hashing import file_sha256
    if file_sha256(path) != rel.sha256:
        raise RuntimeError(f'{path} ({rel.name}) does not match the sha256 of the release in '
                           f'timm_spot/models/_releases.py: the cached file is corrupt or was replaced; delete it '
                           f'and load again (or seed the cache anew with python -m hub cache --all)')


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
    load_from, loc = _check_source(variant, kwargs)
    try:
        model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn,
                                     **kwargs)
        if load_from == 'hf-hub':
            verify_release_file(variant, kwargs, loc)
        return model
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
        if load_from == 'hf-hub':
            cfg = kwargs.get('pretrained_cfg')
            tag = cfg.get('tag') if isinstance(cfg, dict) else cfg if isinstance(cfg, str) else None
            if tag is None:
                registry_cfg = get_pretrained_cfg(variant)
                tag = registry_cfg.tag if registry_cfg is not None else None
            hint = '\n' + offline_routes(variant, tag, loc[0] if isinstance(loc, tuple) else loc)
        raise RuntimeError(
            f'could not load pretrained weights for {variant} from {source}: {type(e).__name__}: {e}{hint}'
        ) from e

"""Export a pretraining run's weights as Hugging Face Hub model folders that timm loads natively.

Input: a run directory written by ``train_scripts/pretrain.py``::

    alexnet_spot.safetensors, alexnet_spot_discriminator.safetensors, damage_repair_generator.safetensors
    model_args.json   constructor kwargs per model name (missing file or model: {})
    config.yaml       the resolved training config (hashed into the metadata, shipped as training_config.yaml)
    metrics.jsonl     one JSON object per log step (summarised in the model card)

Output, per model, ``<out>/<model_name>.<tag>/`` (named like its Hub repo ``timm-spot/<model_name>.<tag>``)
holding exactly what the Hub repo should hold:

* ``model.safetensors``: the state dict as the registered timm model has it (strictly loaded into
  ``timm.create_model(name, **model_args)`` first), with safetensors metadata ``format=pt``, ``architecture``,
  ``model_args``, ``training_run``, ``training_config_sha256``, ``timm_spot_version`` ...; byte-reproducible
  (canonical header). Storage: the backbone ``alexnet_spot`` in float32 (bit-exact); the pretext models
  (discriminator, generator) in bfloat16 by default (``--pretext-dtype``), half the size in git: timm upcasts on
  load (``copy_`` into float32 parameters) and the export checks their outputs against float32 on fixed inputs
  (:data:`BF16_TOLERANCE`, recorded in the metadata and the card);
* ``config.json``: written by timm's own ``save_config_for_hf`` (what ``save_for_hf`` / ``push_to_hf_hub``
  write): ``architecture``, ``num_classes``, ``num_features``, ``global_pool``, ``model_args`` and
  ``pretrained_cfg`` (mean/std/input size/crop of the model's registered cfg, source keys removed);
* ``README.md``: the model card (Hub YAML front matter with ``model-index`` from ``--results``);
* ``training_config.yaml``: the run's config.yaml (when the run has one), verbatim except that a local data path
  is written as :func:`public_data_source` names it (no machine paths in published files).

After writing, the folder is loaded back through timm (``timm.create_model('local-dir:<folder>',
pretrained=True)``) and compared tensor by tensor, and compared with what ``timm.create_model(name,
pretrained=True)`` would build from the registry (shapes and constructor arguments): weights trained with
non-default constructor arguments load only through ``hf-hub:<repo>`` (whose config.json carries
``model_args``), which the export reports and the card says.
"""
import json
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import safetensors.torch
import torch

from timm_spot.run_layout import MODEL_NAMES, RunLayout

from ._files import (PathLike, canonicalize_safetensors, describe_files, public_data_source, read_safetensors_header,
                     file_sha256)
from .card import finetuning_results, normalize_results, render_card
from .provenance import _import_models, _is_registered, _jsonable, git_revision, registry_report

__all__ = [
    'MODEL_NAMES', 'EXPORT_FILES', 'RunInfo', 'ExportResult', 'load_run', 'export_model', 'export_run',
    'registry_report', 'canonical_config_hash', 'public_data_source',
]

PRETEXT_MODELS = ('alexnet_spot_discriminator', 'damage_repair_generator')
# bfloat16 storage of the pretext models: the largest output difference against float32 weights on fixed inputs
# (seeded images in [-1, 1] at the release's size) that an export accepts. Discriminator: the real/corrupt and the
# per-cell mask probabilities (sigmoid of the logits); generator: the autoencoded image in [-1, 1].
BF16_TOLERANCE = {'alexnet_spot_discriminator': 0.02, 'damage_repair_generator': 0.05}
WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'
TRAINING_CONFIG_NAME = 'training_config.yaml'
EXPORT_FILES = (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME, TRAINING_CONFIG_NAME)

# constructor kwargs that are loading options, not architecture: refused in model_args.json
_NOT_MODEL_ARGS = {'pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'checkpoint_path', 'cache_dir',
                   'features_only', 'out_indices', 'feature_cls', 'device', 'dtype', 'scriptable', 'exportable',
                   'no_jit', 'pretrained_model_args'}

# a tag names a folder under --out and the Hub repo timm-spot/<model>.<tag>: the Hub's repo-name characters only
# (no path separators, no '..'), so it can never point out of --out
_TAG_RE = re.compile(r'^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$')
MAX_REPO_NAME = 96  # the Hub's limit on a repo name (<model>.<tag>)

_IMG_SIZE_KEYS = ('img_size', 'image_size', 'input_size', 'crop_size', 'resolution')
_DATA_KEYS = ('train_source', 'data_source', 'source', 'dataset', 'data', 'train_data', 'train_dataset')
_RUN_NAME_KEYS = ('run_name', 'experiment', 'name')


def looks_like_imagenet_1k(source: Optional[str]) -> bool:
    """Whether a recorded data source names ImageNet-1k (a Hub id such as ILSVRC/imagenet-1k, or a local copy)."""
    s = str(source or '').lower()
    other = ('21k', '22k', 'imagenet-r', 'imagenet-a', 'imagenet-o', 'imagenet-sketch', 'imagenet-v2', 'imagenetv2')
    return ('imagenet' in s or 'ilsvrc' in s or 'in1k' in s) and not any(t in s for t in other)


def check_tag(tag: str, name: Optional[str] = None) -> str:
    """``tag`` if it is a valid Hub repo-name part, else ValueError naming it: it becomes a folder name under
    ``--out``, so ``../x`` or ``a/b`` would write (and with --force delete) outside it."""
    if not isinstance(tag, str) or not _TAG_RE.match(tag) or '..' in tag or '--' in tag:
        raise ValueError(f'--tag {tag!r} is not a valid release tag: use letters, digits, ".", "_" and "-" only '
                         f'(not first or last, no ".." or "--"), e.g. spot_c10_64_v2')
    if name is not None and len(f'{name}.{tag}') > MAX_REPO_NAME:
        raise ValueError(f'--tag {tag!r} is too long: the repo name {name}.{tag} has {len(name) + 1 + len(tag)} '
                         f'characters, the Hub allows {MAX_REPO_NAME}; choose a shorter tag')
    return tag


def default_tag(run_dir: PathLike) -> str:
    """The tag of an export without ``--tag``: ``<run dir name>_<YYYYMMDD>``, never a shipped release's tag (an
    export without --tag must not replace the weights under hub/)."""
    base = re.sub(r'[^A-Za-z0-9._-]+', '-', Path(run_dir).resolve().name)
    base = re.sub(r'([._-])[._-]+', r'\1', base).strip('._-')[:48].strip('._-') or 'run'
    return f'{base}_{time.strftime("%Y%m%d")}'


def target_folder(out_dir: PathLike, name: str, tag: str) -> Path:
    """``<out_dir>/<name>.<tag>``, checked to resolve to a direct child of ``out_dir`` (a symlinked folder or a
    crafted tag must not lead anywhere else)."""
    check_tag(tag, name)
    out = Path(out_dir)
    folder = out / f'{name}.{tag}'
    if folder.resolve().parent != out.resolve():
        raise ValueError(f'{folder} resolves to {folder.resolve()}, outside --out {out}: remove the link or choose '
                         f'another --out')
    return folder


def canonical_config_hash(config: Any) -> str:
    """sha256 of the parsed config as canonical JSON (independent of YAML formatting and key order)."""
    import hashlib
    text = json.dumps(config, sort_keys=True, separators=(',', ':'), default=str, ensure_ascii=True)
    return hashlib.sha256(text.encode('utf-8')).hexdigest()


def _find_key(tree: Any, keys: Sequence[str], want: Callable[[Any], bool]) -> Any:
    """First value (breadth first, in ``keys`` order per level) under one of ``keys`` that satisfies ``want``."""
    level = [tree]
    while level:
        nxt = []
        for node in level:
            if isinstance(node, dict):
                for k in keys:
                    if k in node and want(node[k]):
                        return node[k]
                nxt.extend(v for v in node.values() if isinstance(v, (dict, list)))
            elif isinstance(node, list):
                nxt.extend(v for v in node if isinstance(v, (dict, list)))
        level = nxt
    return None


def _as_img_size(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
        spatial = list(value[-2:])
        if len(set(spatial)) == 1 and spatial[0] > 0:
            return spatial[0]
    return None


@dataclass
class RunInfo:
    """What export needs from a pretraining run directory."""
    path: Path
    model_args: Dict[str, Dict[str, Any]]
    config: Optional[Any]
    config_path: Optional[Path]
    config_sha256: Optional[str]
    run_name: str
    img_size: Optional[int]
    data_source: Optional[str]
    metrics: Dict[str, Any] = field(default_factory=dict)
    config_changes: List[Dict[str, Any]] = field(default_factory=list)  # config_history.jsonl: keys a resume changed

    def weights_file(self, name: str) -> Path:
        return RunLayout(self.path).weights(name)

    def available_models(self) -> List[str]:
        return [n for n in MODEL_NAMES if self.weights_file(n).is_file()]


def _summarize_metrics(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    records, bad = [], 0
    with open(path, encoding='utf-8') as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1  # a line cut by a crash: skip it, the card says how many
                continue
            if isinstance(rec, dict):
                records.append(rec)
    if not records:
        return {'records': 0, 'unreadable_lines': bad}
    last = records[-1]
    scalars = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {'records': len(records), 'unreadable_lines': bad, 'last': scalars}


def load_run(run_dir: PathLike) -> RunInfo:
    """Read model_args.json, config.yaml and metrics.jsonl of a run directory (each optional)."""
    import yaml
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f'run directory not found: {run_dir}')
    layout = RunLayout(run_dir)
    args_path = layout.model_args
    model_args: Dict[str, Dict[str, Any]] = {}
    args_img_size = None
    if args_path.is_file():
        try:
            raw = json.loads(args_path.read_text(encoding='utf-8')) or {}
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f'{args_path} is not valid JSON ({e}); restore it from the run or rewrite it as '
                             f'{{model_name: {{kwarg: value}}}}') from None
        if not isinstance(raw, dict):
            raise ValueError(f'{args_path}: expected {{model_name: {{kwarg: value}}, ...}}, got {type(raw).__name__}')
        # the trainer also records 'img_size' and a 'how_to_load' note next to the per-model kwargs
        model_args = {k: v for k, v in raw.items() if isinstance(v, dict)}
        args_img_size = _as_img_size(raw.get('img_size'))
    config = config_path = config_sha = None
    for cand in (layout.config, layout.config.with_suffix('.yml')):
        if cand.is_file():
            config_path = cand
            try:
                config = yaml.safe_load(config_path.read_text(encoding='utf-8'))
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                mark = getattr(e, 'problem_mark', None)
                where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark is not None else ''
                problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
                raise ValueError(f'{config_path} is not valid YAML{where}: {problem}; fix or restore the run\'s '
                                 f'config.yaml') from None
            config_sha = canonical_config_hash(config)
            break
    run_name = None
    img_size = data_source = None
    if isinstance(config, dict):
        run_name = next((config[k] for k in _RUN_NAME_KEYS if isinstance(config.get(k), str) and config[k]), None)
        img_size = _as_img_size(_find_key(config, _IMG_SIZE_KEYS, lambda v: _as_img_size(v) is not None))
        data_source = _find_key(config, _DATA_KEYS, lambda v: isinstance(v, str) and bool(v))
    img_size = args_img_size or img_size
    return RunInfo(
        path=run_dir,
        model_args=model_args,
        config=config,
        config_path=config_path,
        config_sha256=config_sha,
        run_name=run_name or run_dir.resolve().name,
        img_size=img_size,
        data_source=data_source,
        metrics=_summarize_metrics(layout.metrics),
        config_changes=_read_config_history(layout.config_history),
    )


def _read_config_history(path: Path) -> List[Dict[str, Any]]:
    out = []
    if path.is_file():
        for line in path.read_text(encoding='utf-8').splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and 'key' in rec:
                out.append(rec)
    return out


def describe_config_change(r: Dict[str, Any]) -> str:
    return f"{r['key']}: {r.get('old')!r} until stage {r.get('stage')} step {r.get('step')}, then {r.get('new')!r}"


@dataclass
class ExportResult:
    name: str
    folder: Path
    repo_id: str
    files: List[Dict[str, Any]]
    config: Dict[str, Any]
    metadata: Dict[str, str]
    registry: Dict[str, Any]
    warnings: List[str]


def check_recorded_sha256(run_dir: PathLike, weights: Path) -> None:
    """Refuse a run weight file whose sha256 differs from the one the trainer recorded when writing it
    (weights_sha256.json): a corrupted or modified file must not be published (runs of older versions have no
    record and are exported as they are)."""
    record_path = RunLayout(run_dir).weights_sha256
    if not record_path.is_file():
        return
    try:
        record = json.loads(record_path.read_text(encoding='utf-8'))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f'{record_path} is not valid JSON ({e}); restore it from the run') from None
    want = record.get(weights.name) if isinstance(record, dict) else None
    if want and file_sha256(weights) != want:
        raise ValueError(f'{weights} does not match the sha256 recorded when the run wrote it ({record_path.name}): '
                         f'the file is corrupt or was modified since; export from an intact copy of the run')


def _export_model_and_tag(name: str, tag: Optional[str], args: Dict[str, Any], img_size: Optional[int],
                          warns: List[str]):
    """The model to load the run's weights into, built from the tag's cfg, and the tag.

    ``tag``: a registered release (timm_spot/models/_releases.py), or a new one not in the table yet (its cfg is
    made as the table would make it, and a warning says to add the row); default: the model's default release.
    """
    import timm
    from timm_spot.models._releases import find_release, release_cfg
    if not tag:
        rel = find_release(name, None)
        if rel is None:
            raise ValueError(f'{name} has no release yet: pass --tag TAG (e.g. spot_c10_64_v2) and add '
                             f'Release({name!r}, TAG, IMG_SIZE) to timm_spot/models/_releases.py')
        tag = rel.tag
    if _is_registered(name, tag):
        return timm.create_model(f'{name}.{tag}', **args), tag
    size = img_size or 128
    warns.append(f'{name}.{tag} is not in the release table yet: add Release({name!r}, {tag!r}, {size}) to '
                 f'timm_spot/models/_releases.py (newest first) before committing this folder')
    return timm.create_model(name, pretrained_cfg=release_cfg(name, tag, size), **args), tag


def storage_check(name: str, model: torch.nn.Module, stored: Dict[str, torch.Tensor], img_size: int,
                  seed: int = 0) -> Dict[str, float]:
    """Largest output differences between ``model`` (float32) and the same model holding ``stored`` upcast.

    Discriminator: ``p_real`` (sigmoid of the real/corrupt logit) and ``p_mask`` (per-cell mask probabilities);
    generator: ``image`` (the autoencoded image, [-1, 1]). Four seeded images in [-1, 1] at ``img_size``.
    """
    import copy
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, img_size, img_size, generator=g) * 2 - 1
    low = copy.deepcopy(model).eval()
    low.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in stored.items()})
    model = model.eval()

    def run(m):
        if name == 'alexnet_spot_discriminator':
            real, mask = m.forward_pretext(x)
            return {'p_real': torch.sigmoid(real), 'p_mask': torch.sigmoid(mask)}
        return {'image': m.autoencode(x)}

    with torch.no_grad():
        ref, got = run(model), run(low)
    return {k: float((ref[k] - got[k]).abs().max()) for k in ref}


def _check_out_folder(folder: Path, force: bool, name: str = '', tag: str = '') -> None:
    if not folder.exists():
        return
    if not folder.is_dir():
        raise FileExistsError(f'{folder} exists and is not a folder')
    from timm_spot.models._releases import find_release
    if name and tag and find_release(name, tag) is not None and any(folder.iterdir()) and not force:
        raise FileExistsError(
            f'{folder} holds the release {name}.{tag} of timm_spot/models/_releases.py: export under a new --tag, '
            f'or pass --force to replace the release')
    extra = [p.name for p in folder.iterdir() if p.name not in EXPORT_FILES]
    if extra and not force:
        raise FileExistsError(
            f'{folder} holds files the export does not write ({", ".join(sorted(extra))}); the folder is replaced '
            f'as a whole (it is exactly the Hub repo), pass --force to replace it anyway')


def export_model(
        run: RunInfo,
        name: str,
        out_dir: PathLike,
        results: Optional[Any] = None,
        img_size: Optional[int] = None,
        datasets: Optional[Sequence[str]] = None,
        force: bool = False,
        verify: bool = True,
        log: Optional[Callable[[str], None]] = print,
        tag: Optional[str] = None,
        pretext_dtype: str = 'auto',
) -> ExportResult:
    """Export one model of ``run`` to ``<out_dir>/<name>.<tag>/`` (see the module docstring).

    ``tag``: the release tag (default: the model's default release); ``pretext_dtype``: storage of the
    discriminator and generator: ``'auto'`` (bfloat16 where its outputs stay within :data:`BF16_TOLERANCE` of
    float32, else float32 with a warning), ``'bfloat16'`` (an error beyond the tolerance) or ``'float32'``.

    Steps: read and check the run's weights, load them into the release's model, choose their storage, collect the
    metadata and the shipped training config, write the folder (staged, then swapped in), verify it through timm.
    """
    from timm_spot.models._releases import repo_id as _repo_id
    _import_models()
    src, args, state = _read_run_weights(run, name, pretext_dtype)
    warns: List[str] = []
    img_size = img_size or run.img_size
    if tag:
        check_tag(tag, name)
    model, tag = _export_model_and_tag(name, tag, args, img_size, warns)
    folder = target_folder(out_dir, name, tag)
    _check_out_folder(folder, force, name, tag)
    _load_run_weights(model, name, state, src, args)
    tensors, storage = _stored_tensors(name, model, img_size, pretext_dtype, warns)

    repo_id = _repo_id(name, tag)
    data_source = public_data_source(run.data_source)
    config_text, config_sha = _shipped_training_config(run, data_source, warns)
    if tag.endswith('in1k') and not looks_like_imagenet_1k(data_source):
        warns.append(f'training data of the run is {data_source or "not recorded in config.yaml"!s}: '
                     f'these are not ImageNet-1k weights, do not publish them as {repo_id}')
    metadata = _weights_metadata(run, name, tag, repo_id, args, config_sha, data_source, src, img_size, storage)

    stage = folder.parent / f'.{name}.export-tmp'
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        config = _write_model_files(stage, model, tensors, metadata, img_size, config_text)
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        registry = registry_report(name, config.get('model_args', {}), shapes, tag=tag, img_size=img_size)
        warns.extend(_registry_warnings(name, tag, repo_id, registry))
        evaluations = normalize_results(results, name) if results is not None else []
        card = render_card(
            name=name, repo_id=repo_id, config=config, metadata=metadata, registry=registry,
            evaluations=evaluations, finetuning=finetuning_results(results, name) if results is not None else None,
            metrics=run.metrics, datasets=datasets, data_source=data_source,
            num_params=sum(int(t.numel()) for k, t in tensors.items() if not k.endswith('num_batches_tracked')),
            warnings=warns, has_training_config=run.config_path is not None, git_revision=git_revision(),
            storage=storage,
        )
        (stage / CARD_NAME).write_text(card, encoding='utf-8')
        _swap_in(stage, folder, name)
    finally:
        if stage.exists():
            shutil.rmtree(stage)

    if verify:
        verify_export(folder, tensors)
    for w in warns:
        if log is not None:
            log(f'WARNING {name}: {w}')
    files = describe_files(folder)
    if log is not None:
        log(f'exported {name} -> {folder} (repo {repo_id})')
        for f in files:
            log(f"  {f['path']:<22} {f['size']:>12,d} B  sha256 {f['sha256']}")
    return ExportResult(name=name, folder=folder, repo_id=repo_id, files=files, config=config, metadata=metadata,
                        registry=registry, warnings=warns)


def _read_run_weights(run: RunInfo, name: str, pretext_dtype: str):
    """(weights file, constructor kwargs, state dict) of ``name`` in ``run``, each checked: the file is there and
    matches the sha256 the trainer recorded, the storage choice is known, the kwargs are constructor arguments."""
    if name not in MODEL_NAMES:
        raise ValueError(f'unknown model {name!r}; exportable: {", ".join(MODEL_NAMES)}')
    src = run.weights_file(name)
    if not src.is_file():
        raise FileNotFoundError(f'{name}: no weights in the run ({src} missing)')
    check_recorded_sha256(run.path, src)
    if pretext_dtype not in ('auto', 'bfloat16', 'float32'):
        raise ValueError(f"pretext_dtype must be 'auto', 'bfloat16' or 'float32', got {pretext_dtype!r}")
    args = dict(run.model_args.get(name, {}))
    bad = sorted(set(args) & _NOT_MODEL_ARGS)
    if bad:
        raise ValueError(f'{name}: model_args.json holds loading options, not constructor args: {bad}')
    try:
        state = safetensors.torch.load_file(str(src), device='cpu')
    except Exception as e:
        raise RuntimeError(f'{name}: cannot read {src}: {type(e).__name__}: {e}') from e
    return src, args, state


def _load_run_weights(model: torch.nn.Module, name: str, state: Dict[str, torch.Tensor], src: Path,
                      args: Dict[str, Any]) -> None:
    """Load ``state`` strictly into ``model`` (a backbone saved with its pretext BatchNorm is folded first, exact)
    and set it to eval."""
    if name == 'alexnet_spot':
        from timm_spot.models.alexnet_spot import checkpoint_filter_fn
        state = checkpoint_filter_fn(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RuntimeError(
            f'{name}: the run weights {src} do not fit timm.create_model({name!r}, **{args!r}) '
            f'(model_args.json out of date?): {e}') from e
    model.eval()


def _stored_tensors(name: str, model: torch.nn.Module, img_size: Optional[int], pretext_dtype: str,
                    warns: List[str]):
    """(tensors to write, storage record): float32, or bfloat16 for a pretext model whose outputs stay within
    :data:`BF16_TOLERANCE` (``pretext_dtype='bfloat16'`` makes going beyond it an error, ``'auto'`` a warning)."""
    tensors = {k: v.detach().to('cpu').contiguous() for k, v in model.state_dict().items()}
    storage: Dict[str, Any] = {'dtype': 'float32'}
    if name not in PRETEXT_MODELS or pretext_dtype == 'float32':
        return tensors, storage
    low = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}
    size = img_size or model.pretrained_cfg.get('input_size', (3, 128, 128))[-1]
    diffs = storage_check(name, model, low, size)
    worst = max(diffs.values())
    if worst <= BF16_TOLERANCE[name]:
        return low, {'dtype': 'bfloat16', 'max_abs_diff': {k: round(v, 6) for k, v in diffs.items()},
                     'tolerance': BF16_TOLERANCE[name], 'check': f'4 seeded images in [-1, 1] at {size} px'}
    if pretext_dtype == 'bfloat16':
        raise RuntimeError(
            f'{name}: bfloat16 storage changes the outputs by {worst:.4f} > {BF16_TOLERANCE[name]} ({diffs}); '
            f'export with --pretext-dtype auto or float32')
    warns.append(f'bfloat16 storage would change the outputs by {worst:.4f} > {BF16_TOLERANCE[name]}: '
                 f'stored in float32')
    return tensors, storage


def _shipped_training_config(run: RunInfo, data_source: Optional[str], warns: List[str]):
    """(text of training_config.yaml or None, its canonical sha256): the run's config.yaml with a local data path
    written as :func:`public_data_source` names it, headed by the keys a ``--resume`` changed (also warned)."""
    config_text, config_sha = None, run.config_sha256
    if run.config_path is not None:
        config_text = run.config_path.read_text(encoding='utf-8')
        if run.data_source and data_source != run.data_source:  # the shipped copy names no machine path
            import yaml
            config_text = config_text.replace(str(run.data_source), str(data_source))
            config_sha = canonical_config_hash(yaml.safe_load(config_text))
    if run.config_changes:  # the training config held other values before a --resume: say so where it is shipped
        if config_text is not None and 'config_history.jsonl' not in config_text:
            config_text = ('# resumed with changed keys (config_history.jsonl of the run); the values below hold '
                           'from that point on:\n' + ''.join(f'#   {describe_config_change(r)}\n'
                                                            for r in run.config_changes) + config_text)
        warns.append('the training config changed on --resume (training_config.yaml holds the last values): '
                     + '; '.join(describe_config_change(r) for r in run.config_changes))
    return config_text, config_sha


def _weights_metadata(run: RunInfo, name: str, tag: str, repo_id: str, args: Dict[str, Any],
                      config_sha: Optional[str], data_source: Optional[str], src: Path, img_size: Optional[int],
                      storage: Dict[str, Any]) -> Dict[str, str]:
    """The safetensors header metadata: what the weights are, where they came from, and how they are stored."""
    import timm
    import timm_spot
    metadata = {
        'format': 'pt',
        'architecture': name,
        'pretrained_tag': tag,
        'hf_hub_id': repo_id,
        'model_args': json.dumps(_jsonable(args), sort_keys=True),
        'training_run': run.run_name,
        'training_config_sha256': config_sha or 'none',
        'training_data': str(data_source) if data_source else 'unknown',
        'source_file_sha256': file_sha256(src),
        'timm_spot_version': timm_spot.__version__,
        'timm_version': timm.__version__,
        'torch_version': torch.__version__.split('+')[0],
    }
    if img_size:
        metadata['img_size'] = str(img_size)
    metadata['storage_dtype'] = storage['dtype']
    if 'max_abs_diff' in storage:
        metadata['storage_check'] = json.dumps(storage, sort_keys=True)
    return metadata


def _write_model_files(stage: Path, model: torch.nn.Module, tensors: Dict[str, torch.Tensor],
                       metadata: Dict[str, str], img_size: Optional[int],
                       config_text: Optional[str]) -> Dict[str, Any]:
    """Write model.safetensors (canonical header), config.json (timm's own writer) and training_config.yaml into
    ``stage``; returns the config.json written."""
    from timm.models._hub import save_config_for_hf  # private: no public name in timm 1.0.31
    safetensors.torch.save_file(tensors, str(stage / WEIGHTS_NAME), metadata=metadata)
    canonicalize_safetensors(stage / WEIGHTS_NAME)
    data_config = {'img_size': img_size} if img_size else None
    save_config_for_hf(model, str(stage / CONFIG_NAME), data_config=data_config)
    config = json.loads((stage / CONFIG_NAME).read_text())
    if config_text is not None:
        (stage / TRAINING_CONFIG_NAME).write_text(config_text, encoding='utf-8')
    return config


def _registry_warnings(name: str, tag: str, repo_id: str, registry: Dict[str, Any]) -> List[str]:
    """What to say when the registered name does not load these weights, or loads them into another model."""
    if not registry['loadable']:
        return [f"timm.create_model({name + '.' + tag!r}, pretrained=True) cannot load these weights (registry "
                f"defaults build other shapes: {'; '.join(registry['shape_mismatches'][:3])}); only "
                f"'hf-hub:{repo_id}' loads them"]
    if not registry['equivalent']:
        return [f"timm.create_model({name!r}, pretrained=True) loads these weights into a model with other "
                f"constructor args ({', '.join(registry['nondefault_args'])}); 'hf-hub:{repo_id}' rebuilds the "
                f"trained model"]
    return []


def _swap_in(stage: Path, folder: Path, name: str) -> None:
    """Replace ``folder`` by ``stage``: by rename, delete last, so that at every instant either the old or the new
    folder is at ``folder`` (a kill between the renames leaves the old one at ``.<name>.export-old``, complete)."""
    old = folder.parent / f'.{name}.export-old'
    if old.exists():  # left by a killed export: the released folder if it is the only copy
        if folder.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, folder)
    if folder.exists():
        os.replace(folder, old)
    try:
        os.replace(stage, folder)
    except BaseException:
        if old.exists() and not folder.exists():
            os.replace(old, folder)
        raise
    if old.exists():
        shutil.rmtree(old)


def verify_export(folder: PathLike, tensors: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Load ``folder`` back through timm (``local-dir:``) and check every tensor is bit-identical."""
    import timm
    _import_models()
    folder = Path(folder)
    header = read_safetensors_header(folder / WEIGHTS_NAME)
    meta = header.get('__metadata__', {})
    if meta.get('format') != 'pt':
        raise RuntimeError(f'{folder / WEIGHTS_NAME}: metadata format is {meta.get("format")!r}, not "pt"')
    if tensors is None:
        tensors = safetensors.torch.load_file(str(folder / WEIGHTS_NAME))
    loaded = timm.create_model(f'local-dir:{folder.resolve()}', pretrained=True).state_dict()
    if set(loaded) != set(tensors):
        raise RuntimeError(f'{folder}: timm loads keys {sorted(set(loaded) ^ set(tensors))} differently')
    for k, v in tensors.items():
        # bfloat16 storage: timm copies into the float32 parameters, which is exact (every bf16 is a float32)
        want = v.to(loaded[k].dtype) if (v.dtype, loaded[k].dtype) == (torch.bfloat16, torch.float32) else v
        if loaded[k].dtype != want.dtype or not torch.equal(loaded[k], want):
            raise RuntimeError(f'{folder}: tensor {k} differs after loading through timm')


def export_run(
        run_dir: PathLike,
        out_dir: PathLike,
        models: Optional[Sequence[str]] = None,
        results: Optional[Any] = None,
        img_size: Optional[int] = None,
        datasets: Optional[Sequence[str]] = None,
        force: bool = False,
        verify: bool = True,
        log: Optional[Callable[[str], None]] = print,
        tag: Optional[str] = None,
        pretext_dtype: str = 'auto',
) -> List[ExportResult]:
    """Export the models of a run (default: every model with a ``<name>.safetensors`` in it) as release ``tag``
    (default: a new tag :func:`default_tag`, never a shipped release) to ``<out_dir>/<name>.<tag>/``."""
    if tag:
        check_tag(tag)
    run = load_run(run_dir)
    names = list(models) if models else run.available_models()
    if not names:
        raise FileNotFoundError(f'{run_dir}: no model weights ({", ".join(n + ".safetensors" for n in MODEL_NAMES)})')
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        raise ValueError(f'unknown model(s) {unknown}; exportable: {", ".join(MODEL_NAMES)}')
    if not tag:
        tag = default_tag(run.path)
        if log is not None:
            log(f'no --tag given: exporting as the new tag {tag!r} (pass --tag TAG to name a release)')
    if log is not None:
        log(f'run {run.path} ({run.run_name}); config sha256 {run.config_sha256 or "none (no config.yaml)"}; '
            f'img_size {img_size or run.img_size or "registry default"}; python {platform.python_version()}')
    return [export_model(run, n, out_dir, results=results, img_size=img_size, datasets=datasets, force=force,
                         verify=verify, log=log, tag=tag, pretext_dtype=pretext_dtype) for n in names]

"""Model cards (``README.md`` with Hub YAML front matter) for the exported models.

Measured results come from ``--results`` (a JSON file); the card's ``model-index`` holds ONLY those, labelled as
this project's measurements of these weights. The paper's numbers (Jenni & Favaro 2018, the authors' TF model)
appear in the card body next to them, never in ``model-index``.

Accepted ``--results`` layouts (values are top-1 accuracies in percent):

* the dict returned by ``timm_spot.eval.layerwise_probe`` / ``train_linear_probes``:
  ``{"conv1": {"top1": 19.1, ...}, ..., "conv5": {...}, "_meta": {...}}``;
* ``{"evaluations": [EVAL, ...]}`` or ``[EVAL, ...]`` with
  ``EVAL = {"dataset": "ILSVRC/imagenet-1k" | {"name", "type", "split"}, "split": "validation",
  "protocol": "...", "layers": {"conv1": 19.1 | {"top1": 19.1}, ...}, "_meta": {...}}``;
* any of these keyed by model name (``{"alexnet_spot": ..., "alexnet_spot_discriminator": ...}``); unkeyed
  results belong to ``alexnet_spot``.
"""
import json
import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from ._files import PathLike, public_data_source

__all__ = ['normalize_results', 'render_card', 'split_front_matter', 'PAPER_RESULTS']

_MODELS = ('alexnet_spot', 'alexnet_spot_discriminator', 'damage_repair_generator')
_LAYERS = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5')

PAPER = 'Self-Supervised Feature Learning by Learning to Spot Artifacts'
PAPER_URL = 'https://arxiv.org/abs/1806.05024'
CODE_URL = 'https://github.com/sjenni/LearningToSpotArtifacts'

# Jenni & Favaro, CVPR 2018 (numbers of the authors' model, NOT of these weights)
PAPER_RESULTS = {
    'imagenet_probes': {  # Table 4: linear probes on frozen layers, ImageNet val top-1 (Zhang et al. protocol)
        'ours (paper)': (19.5, 33.3, 37.9, 38.9, 34.9),
        'random init (paper)': (11.6, 17.1, 16.9, 16.3, 14.1),
        'supervised ImageNet (paper)': (19.3, 36.3, 44.2, 48.3, 50.5),
    },
    'places_probes': {  # Table 5: the same on Places
        'ours (paper)': (23.3, 34.3, 36.9, 37.3, 34.4),
        'random init (paper)': (15.7, 20.3, 19.8, 19.1, 17.5),
    },
    'stl10': {'frozen conv1-5 + linear': '76.9 +- 0.2', 'fine-tuned': '80.1 +- 0.3'},  # Table 2
    'voc': {'classification (mAP)': 69.8, 'detection (mAP)': 52.5, 'segmentation (mIU)': 38.1},  # Table 3
}

_CITATION = """@inproceedings{jenni2018spot,
  title     = {Self-Supervised Feature Learning by Learning to Spot Artifacts},
  author    = {Jenni, Simon and Favaro, Paolo},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2018}
}"""

_MODEL_INFO = {
    'alexnet_spot': dict(
        pipeline_tag='image-feature-extraction',
        model_type='image feature extraction (returns pooled conv5 features)',
        tags=['image-feature-extraction', 'timm', 'self-supervised', 'timm-spot', 'learning-to-spot-artifacts',
              'alexnet'],
        summary='AlexNet conv1..conv5 backbone pretrained without labels by learning to spot artifacts: the '
                'transferable part of the pretext discriminator (its pretraining BatchNorm after conv5 folded '
                'into conv5). No classifier (`num_classes=0`): the model returns pooled 256-d conv5 features.',
        io='Input: RGB images normalised with this config\'s mean/std (the authors\' 0..255 minus ImageNet RGB '
           'means, i.e. std 1/255). `forward_features` returns the conv5 map (256 x H/16 x W/16, TF-"SAME" '
           'padding, no pool5); `features_only=True` gives the conv1..conv5 taps after ReLU (strides 4, 8, 16, '
           '16, 16).',
        snippet="""with torch.no_grad():
    pooled = model(x)                  # [1, 256] pooled conv5 features (num_classes=0)
    conv5 = model.forward_features(x)  # [1, 256, H/16, W/16]

# conv1..conv5 taps (after ReLU), e.g. for layerwise linear probes
taps = timm.create_model({create_args}, features_only=True).eval()
with torch.no_grad():
    print(pooled.shape, conv5.shape, [t.shape for t in taps(x)])
# fine-tuning with a new classifier: timm.create_model({create_args}, num_classes=10)""",
    ),
    'alexnet_spot_discriminator': dict(
        pipeline_tag='image-classification',
        model_type='image classification (real vs. corrupt: one logit) with a per-cell artifact map',
        tags=['image-classification', 'image-feature-extraction', 'timm', 'self-supervised', 'timm-spot',
              'learning-to-spot-artifacts', 'alexnet', 'discriminator'],
        summary='The pretext discriminator C of "Learning to Spot Artifacts": AlexNet conv1..conv5 with BatchNorm '
                'after conv5, a real/corrupt head (fc6 spanning the conv5 map, one logit: > 0 means real) and a '
                'drop-mask head (per conv5 cell: > 0 kept, < 0 artifact). For transfer use `alexnet_spot`.',
        io='`forward` takes timm-normalised images (this config\'s mean/std) and returns the real/corrupt logit; '
           '`forward_pretext(x)` takes images in [-1, 1] and returns (real logit, mask logits).',
        snippet="""# forward_pretext takes the image in [-1, 1] (as in pretraining), not timm-normalised
x_pm1 = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1
with torch.no_grad():
    real_logit = model(x)                          # [1, 1], > 0: looks real
    real, mask = model.forward_pretext(x_pm1)      # mask logits [1, 1, H/16, W/16], < 0: artifact
print(real_logit.shape, mask.shape)""",
    ),
    'damage_repair_generator': dict(
        # no pipeline tag: model(x) is timm's head on the generated image (a pooled 3-vector, as timm's contract
        # asks); the images come from autoencode() / damage_and_repair(), which no Hub pipeline calls
        # (image-to-image would promise an image)
        pipeline_tag=None,
        pipeline_note='No `pipeline_tag`: `model(x)` returns the generated image average-pooled by timm\'s head '
                      '(3 numbers), not an image, so neither image-to-image nor a feature-extraction pipeline '
                      'would show what the model does; the images come from `autoencode(x)` and '
                      '`damage_and_repair(x)` (below). `model(x)` pools because timm\'s model contract requires '
                      'it: timm\'s model tests remove the classifier with `reset_classifier(0)`, which keeps the '
                      'pooling, and expect a `[B, C]` output; `timm.create_model(..., global_pool=\'\')` builds a '
                      'model whose `model(x)` is the image.',
        model_type='generator (autoencoder with damage & repair; `model(x)` is a pooled 3-vector, images come '
                   'from `autoencode` / `damage_and_repair`)',
        tags=['timm', 'self-supervised', 'timm-spot', 'learning-to-spot-artifacts', 'autoencoder', 'generator'],
        summary='The damage & repair generator of "Learning to Spot Artifacts": an autoencoder (E, D) whose '
                'encoder features are damaged by dropping whole cells and repaired by gated residual blocks; it '
                'makes the real (autoencoded) and corrupt (repaired) images the discriminator learns to tell '
                'apart.',
        io='Images in [-1, 1] (mean = std = 0.5 in timm\'s convention), H and W multiples of 16. '
           '`forward_features` returns the generated image (eval: autoencoded; train: damaged & repaired).',
        snippet="""# x is already in [-1, 1]: this model's mean = std = 0.5
with torch.no_grad():
    recon = model.autoencode(x)                    # real examples D(E(x)), [1, 3, H, W] in [-1, 1]
    corrupt, mask = model.damage_and_repair(x)     # corrupt examples and the drop mask
    pooled = model(x)                              # [1, 3]: timm's head pools the generated image
print(recon.shape, corrupt.shape, mask.shape, pooled.shape)""",
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------------------------

def _layer_value(v: Any) -> Optional[float]:
    if isinstance(v, dict):
        v = v.get('top1', v.get('acc', v.get('accuracy')))
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _dataset_fields(item: Dict[str, Any], meta: Dict[str, Any]) -> Dict[str, str]:
    """Dataset name/type/split of an evaluation; local paths as ``public_data_source`` names them (no machine
    paths in a published card)."""
    ds = item.get('dataset', meta.get('dataset', meta.get('source')))
    if isinstance(ds, dict):
        ds = {k: public_data_source(v) if isinstance(v, str) else v for k, v in ds.items()}
    elif isinstance(ds, str):
        ds = public_data_source(ds)
    if isinstance(ds, dict):
        name = ds.get('name') or ds.get('type') or 'unspecified'
        out = {'name': str(name), 'type': str(ds.get('type') or name)}
        if ds.get('split'):
            out['split'] = str(ds['split'])
    else:
        name = str(ds) if ds else 'unspecified'
        out = {'name': name, 'type': name}
    split = item.get('split') or meta.get('val_split') or meta.get('split')
    if split and 'split' not in out:
        out['split'] = str(split)
    return out


def _normalize_eval(item: Any) -> Dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError(f'an evaluation must be a JSON object, got {type(item).__name__}')
    meta = item.get('_meta') or item.get('meta') or {}
    raw_layers = item.get('layers')
    if raw_layers is None:
        raw_layers = {k: v for k, v in item.items() if not k.startswith('_') and _layer_value(v) is not None
                      and k not in ('split',)}
    layers = {}
    for k, v in raw_layers.items():
        val = _layer_value(v)
        if val is None:
            raise ValueError(f'results: layer {k!r} has no top-1 value ({v!r})')
        if not 0.0 <= val <= 100.0:
            raise ValueError(f'results: layer {k!r} top-1 {val} is not a percentage')
        layers[str(k)] = round(val, 2)
    if not layers:
        raise ValueError(f'results: no per-layer accuracies in {sorted(item)}')
    notes = {}
    for key in ('img_size', 'n_train', 'n_val', 'num_classes', 'weights', 'seconds_total'):
        if meta.get(key) is not None:
            notes[key] = os.path.basename(str(meta[key])) if key == 'weights' else meta[key]
    cfg = meta.get('config') or {}
    if isinstance(cfg, dict) and cfg.get('epochs') is not None:
        notes['probe_epochs'] = cfg['epochs']
    if item.get('notes'):
        notes['notes'] = item['notes']
    return dict(
        dataset=_dataset_fields(item, meta),
        protocol=str(item.get('protocol') or 'linear probe on frozen features, one per layer'),
        layers=layers,
        notes=notes,
    )


def normalize_results(results: Any, model_name: str) -> List[Dict[str, Any]]:
    """Evaluations of ``model_name`` in ``results`` (a path, or the parsed JSON), in a uniform layout."""
    if isinstance(results, (str, os.PathLike)):
        results = json.loads(Path(results).read_text(encoding='utf-8'))
    if results is None:
        return []
    if isinstance(results, dict) and any(k in _MODELS for k in results):
        results = results.get(model_name)
        if results is None:
            return []
    elif model_name != 'alexnet_spot':
        return []  # unkeyed results are the transferable backbone's
    if isinstance(results, dict) and 'evaluations' in results:
        items = results['evaluations']
    elif isinstance(results, list):
        items = results
    else:
        items = [results]
    return [_normalize_eval(i) for i in items]


def finetuning_results(results: Any, model_name: str) -> Optional[Dict[str, Any]]:
    """The fine-tuning benchmark entry of ``model_name`` in ``results`` (``{model: {"finetuning": {...}}}``), or None.

    Written by ``benchmarks/finetune_c10_table.py --hub-results``; checked here so a card never shows a half entry.
    """
    if isinstance(results, (str, os.PathLike)):
        results = json.loads(Path(results).read_text(encoding='utf-8'))
    entry = (results or {}).get(model_name) if isinstance(results, dict) else None
    entry = entry.get('finetuning') if isinstance(entry, dict) else None
    if entry is None:
        return None
    missing = [k for k in ('protocol', 'command', 'this_weights', 'table', 'summary') if k not in entry]
    if missing:
        raise ValueError(f'results: the fine-tuning entry of {model_name} lacks {missing}')
    return entry


# ----------------------------------------------------------------------------------------------------------------
# card
# ----------------------------------------------------------------------------------------------------------------

def _hf_dataset_id(source: Optional[str]) -> Optional[str]:
    if not source or source == 'builtin':
        return None
    if '/' in source and not os.path.exists(source) and not source.startswith(('.', '/', '~')) and \
            source.count('/') == 1 and not source.endswith(('.parquet', '.arrow', '.csv', '.json', '.jsonl')):
        return source
    return None


def _data_text(source: Optional[str], datasets: Sequence[str]) -> str:
    """The pretraining data as a published card names it: the public dataset, never a local path."""
    if not source:
        return 'not recorded'
    if source == 'builtin':
        return "scikit-image's bundled sample photographs (random crops)"
    if source.startswith(('local:', '$TIMM_SPOT_DATA/')) or _hf_dataset_id(source) is None:
        kind = 'Parquet' if source.endswith('.parquet') else 'Arrow' if source.endswith('.arrow') else 'local'
        if datasets:
            return f'`{datasets[0]}`, read from a {kind} copy, without labels'
        return f'a {kind} copy of a dataset not named here, without labels'
    return f'`{source}`, without labels'


def split_front_matter(text: str) -> Tuple[dict, str]:
    """(YAML front matter as a dict, body) of a model card."""
    if not text.startswith('---\n'):
        raise ValueError('model card has no YAML front matter (must start with ---)')
    end = text.find('\n---\n', 4)
    if end < 0:
        raise ValueError('model card front matter is not closed by ---')
    meta = yaml.safe_load(text[4:end])
    if not isinstance(meta, dict):
        raise ValueError('model card front matter is not a mapping')
    return meta, text[end + 5:]


def _fmt(v: Any) -> str:
    return f'{v:.2f}' if isinstance(v, float) else str(v)


def _eval_label(ev: Dict[str, Any]) -> str:
    ds = ev['dataset']
    label = ds['name'] + (f" ({ds['split']})" if ds.get('split') else '')
    if ev['notes'].get('img_size'):
        label += f", {ev['notes']['img_size']} px"
    return label


def render_card(
        name: str,
        repo_id: str,
        config: Dict[str, Any],
        metadata: Dict[str, str],
        registry: Dict[str, Any],
        evaluations: Sequence[Dict[str, Any]] = (),
        metrics: Optional[Dict[str, Any]] = None,
        datasets: Optional[Sequence[str]] = None,
        data_source: Optional[str] = None,
        num_params: Optional[int] = None,
        warnings: Sequence[str] = (),
        has_training_config: bool = False,
        git_revision: Optional[str] = None,
        storage: Optional[Dict[str, Any]] = None,
        data_description: Optional[str] = None,
        finetuning: Optional[Dict[str, Any]] = None,
) -> str:
    """The README.md of one exported model folder.

    Published as is, so: no machine paths or run-folder names (the pretraining data is named by its public dataset
    id), an explicit license, a pipeline tag only where the model's ``forward`` does what the pipeline promises,
    a Usage snippet that runs as written (it makes its own image), and a git commit only when the tree was clean
    (``git_revision`` ending in ``-dirty`` is reported as uncommitted changes, with a warning).
    ``data_description``: a sentence replacing the generated "Pretraining data" entry; ``finetuning``: the
    fine-tuning benchmark entry (:func:`finetuning_results`).
    """
    info = _MODEL_INFO[name]
    pcfg = config.get('pretrained_cfg', {})
    tag = metadata.get('pretrained_tag', 'spot_in1k')
    model_id = f'{name}.{tag}'
    ds_list = _card_datasets(datasets, data_source, tag)
    license_id = pcfg.get('license') or 'mit'
    warnings = list(warnings)
    dirty = bool(git_revision) and git_revision.endswith('-dirty')
    if dirty:
        warnings.append('generated from a working tree with uncommitted changes: export again from a clean commit '
                        'before publishing')
    front = _front_matter(info, license_id, ds_list, evaluations, model_id)
    lines: List[str] = ['---', yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=1000).rstrip(),
                        '---', '', f'# Model card for {model_id}', '', info['summary'], '']
    if warnings:
        lines += ['> **Note**', '>'] + [f'> - {w}' for w in warnings] + ['']
    lines += _details_section(name, info, pcfg, config, license_id, num_params, storage,
                              data_description or _data_text(data_source, ds_list))
    lines += _usage_section(info, model_id, repo_id, registry)
    lines += _results_section(evaluations)
    lines += _finetuning_section(finetuning) if finetuning else []
    lines += _training_section(metadata, metrics, has_training_config, git_revision, dirty)
    lines += ['', '## Citation', '', '```bibtex', _CITATION, '```', '']
    return '\n'.join(lines)


def _card_datasets(datasets: Optional[Sequence[str]], data_source: Optional[str], tag: str) -> List[str]:
    """The front matter's ``datasets``: as given, else the Hub dataset id of the data source (local files or the
    demo photos are no Hub dataset), else (not recorded) what the tag stands for (export warns)."""
    if datasets:
        return list(datasets)
    if data_source:
        guessed = _hf_dataset_id(data_source)
        return [guessed] if guessed else []
    return ['ILSVRC/imagenet-1k'] if tag.endswith('in1k') else []


def _front_matter(info: Dict[str, Any], license_id: str, ds_list: List[str],
                  evaluations: Sequence[Dict[str, Any]], model_id: str) -> Dict[str, Any]:
    """The Hub YAML front matter; ``model-index`` holds only this project's measurements of these weights."""
    front: Dict[str, Any] = {'library_name': 'timm', 'license': license_id}
    if info['pipeline_tag']:
        front['pipeline_tag'] = info['pipeline_tag']
    front['tags'] = list(info['tags'])
    if ds_list:
        front['datasets'] = ds_list
    if evaluations:
        results = []
        for ev in evaluations:
            results.append({
                'task': {'type': 'image-classification',
                         'name': f"{ev['protocol']} (timm-spot measurement of these weights)"},
                'dataset': dict(ev['dataset']),
                'metrics': [
                    {'type': 'accuracy', 'name': f'{layer} top-1, linear probe (measured by timm-spot)',
                     'value': value, 'verified': False}
                    for layer, value in ev['layers'].items()
                ],
            })
        front['model-index'] = [{'name': model_id, 'results': results}]
    return front


def _details_section(name: str, info: Dict[str, Any], pcfg: Dict[str, Any], config: Dict[str, Any],
                     license_id: str, num_params: Optional[int], storage: Optional[Dict[str, Any]],
                     data_text: str) -> List[str]:
    """"Model details": type, license, size, input, paper, data, constructor arguments and storage."""
    lines = ['## Model details', '',
             f'- **Model type:** {info["model_type"]} (timm architecture `{name}`, registered by the `timm-spot` '
             f'package)',
             f'- **License:** `{license_id}` (weights trained and released by timm-spot under its license)']
    if num_params is not None:
        lines.append(f'- **Parameters (M):** {num_params / 1e6:.2f}')
    in_size = pcfg.get('input_size')
    if in_size:
        lines.append(f'- **Image size:** {in_size[1]} x {in_size[2]} (any multiple of 16 works)')
    lines += [
        f'- **Input normalisation:** mean {[round(m, 4) for m in pcfg.get("mean", [])]}, '
        f'std {[round(s, 5) for s in pcfg.get("std", [])]} (timm convention, images in 0..1)',
        f'- **Papers:** [{PAPER}]({PAPER_URL}) (Jenni & Favaro, CVPR 2018)',
        f'- **Original code:** {CODE_URL} (TensorFlow 1 demo; this is a PyTorch re-implementation, trained by '
        f'timm-spot, not the authors\' weights)',
        f'- **Pretraining data:** {data_text}',
        f'- **Constructor arguments (`model_args` in config.json):** `{json.dumps(config.get("model_args", {}))}`',
    ]
    if storage and storage.get('dtype') == 'bfloat16':
        diffs = ', '.join(f'{k} {v:.4f}' for k, v in storage.get('max_abs_diff', {}).items())
        lines.append(
            f'- **Storage:** bfloat16 (half the size; timm upcasts into float32 parameters on load). Largest output '
            f'difference against the float32 weights ({storage.get("check", "fixed inputs")}): {diffs} '
            f'(export tolerance {storage.get("tolerance")}).')
    elif storage:
        lines.append(f'- **Storage:** {storage.get("dtype", "float32")}, bit-exact with the trained weights.')
    lines += ['', info['io'], '']
    if info.get('pipeline_note'):
        lines += [info['pipeline_note'], '']
    return lines


def _usage_section(info: Dict[str, Any], model_id: str, repo_id: str, registry: Dict[str, Any]) -> List[str]:
    """"Usage": a snippet that runs as written, how to pin and load offline, and when the bare name does not load
    these weights."""
    registry_ok = registry.get('loadable', True)
    equivalent = registry.get('equivalent', True)
    create_args = f"'{model_id}', pretrained=True" if equivalent else f"'hf-hub:{repo_id}', pretrained=True"
    lines = ['## Usage', '', '```python', 'import numpy as np', 'import timm', 'import torch', 'from PIL import Image',
             '', 'import timm_spot  # registers the timm-spot models with timm (pip install timm-spot)', '']
    if registry_ok and equivalent:
        lines += [f"model = timm.create_model('{model_id}', pretrained=True).eval()",
                  '# or name this repo explicitly (reads its config.json):',
                  f"# model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()"]
    else:
        lines += ["# these weights use non-default constructor arguments: load them through the repo id",
                  f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()"]
    lines += ['',
              'data_config = timm.data.resolve_model_data_config(model)',
              'transform = timm.data.create_transform(**data_config, is_training=False)',
              '# a stand-in image so that this runs as is; yours: img = Image.open(path).convert(\'RGB\')',
              "h, w = data_config['input_size'][1:]",
              'img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))',
              'x = transform(img).unsqueeze(0)', '',
              info['snippet'].format(create_args=create_args), '```', '']
    lines += ['Pin an exact revision (recommended for reproducible work): '
              f"`timm.create_model('hf-hub:{repo_id}@<commit>', pretrained=True)`; a default cfg can carry the "
              f"same `hf_hub_id='{repo_id}@<commit>'`.", '',
              'Offline: download once (`hf download ' + repo_id + '`), copy the Hugging Face cache to the offline '
              'machine and set `HF_HUB_OFFLINE=1`. From a timm-spot checkout, whose `hub/` folder ships the released '
              f"weights: `timm.create_model('local-dir:hub/{model_id}', pretrained=True)`, or seed a cache with "
              'every shipped release: `python -m hub cache --all --cache-dir DIR`, then `HF_HUB_CACHE=DIR '
              'HF_HUB_OFFLINE=1`.', '']
    if not registry_ok:
        lines += [f"`timm.create_model('{model_id}', pretrained=True)` does NOT load these weights: the registered "
                  'defaults build other tensor shapes (' + '; '.join(registry.get('shape_mismatches', [])[:3]) +
                  ').', '']
    elif not equivalent:
        diff = ', '.join(f"{k}={v['exported']!r} (registry default {v['registry']!r})"
                         for k, v in registry.get('nondefault_args', {}).items())
        lines += [f"`timm.create_model('{model_id}', pretrained=True)` loads these weights into a model built with "
                  f"the registry defaults, which differ: {diff}. Use the `hf-hub:` name.", '']
    return lines


def _results_section(evaluations: Sequence[Dict[str, Any]]) -> List[str]:
    """"Results": this project's measurements of these weights, then the paper's numbers of the authors' model."""
    lines = ['## Results', '']
    if evaluations:
        layers = [l for l in _LAYERS if any(l in ev['layers'] for ev in evaluations)]
        other = sorted({l for ev in evaluations for l in ev['layers'] if l not in _LAYERS})
        cols = layers + other
        lines += ['### Measured by this project (timm-spot), these weights', '',
                  'Top-1 accuracy (%) of a linear classifier on each frozen layer. These are OUR measurements of the '
                  'weights in this repo, with our (smaller) protocol; they are not the paper\'s numbers.', '',
                  '| evaluation | protocol | ' + ' | '.join(cols) + ' |',
                  '|---|---|' + '---:|' * len(cols)]
        for ev in evaluations:
            lines.append(f'| {_eval_label(ev)} | {ev["protocol"]} | ' +
                         ' | '.join(_fmt(ev['layers'].get(c, '-')) for c in cols) + ' |')
        lines.append('')
        for ev in evaluations:
            if ev['notes']:
                lines.append(f"- {_eval_label(ev)}: " + ', '.join(f'{k} {v}' for k, v in ev['notes'].items()))
        lines.append('')
    else:
        lines += ['No measurements of these weights are recorded in this card yet.', '']
    lines += ['### Reported in the paper (the authors\' model, for reference; not these weights)', '',
              'Linear probes on frozen layers (Table 4: ImageNet; Table 5: Places), top-1 %, AlexNet at 224 px with '
              'the Zhang et al. 2016 protocol:', '',
              '| paper row | ' + ' | '.join(_LAYERS) + ' |', '|---|' + '---:|' * len(_LAYERS)]
    for table, label in (('imagenet_probes', 'ImageNet'), ('places_probes', 'Places')):
        for row, vals in PAPER_RESULTS[table].items():
            lines.append(f'| {label}: {row} | ' + ' | '.join(f'{v:.1f}' for v in vals) + ' |')
    lines += ['', 'STL-10 (Table 2): frozen conv1-5 + linear ' + PAPER_RESULTS['stl10']['frozen conv1-5 + linear'] +
              ', fine-tuned ' + PAPER_RESULTS['stl10']['fine-tuned'] + '. Pascal VOC (Table 3): ' +
              ', '.join(f'{k} {v}' for k, v in PAPER_RESULTS['voc'].items()) + '.', '']
    return lines


def _finetuning_section(entry: Dict[str, Any]) -> List[str]:
    """"Fine-tuning": held-out top-1 per initialisation and label fraction, with the paired gain over random."""
    lines = ['### Fine-tuning through timm\'s train.py (does `pretrained=True` help?)', '', entry['summary'], '',
             entry['protocol'], '']
    for variant, by_fraction in entry['table'].items():
        fractions = [f for f, cell in by_fraction.items() if cell]
        if not fractions:
            continue
        lines += [f'{variant}: held-out top-1 %, mean ± SD over seeds (n), [paired gain over random init]', '',
                  '| initialisation | ' + ' | '.join(f'{f} of the labels' for f in fractions) + ' |',
                  '|---|' + '---:|' * len(fractions)]
        inits = list(dict.fromkeys(i for f in fractions for i in by_fraction[f]))
        for init in inits:
            cells = [_finetuning_cell(by_fraction[f].get(init)) for f in fractions]
            label = f"{init} (these weights)" if init == entry['this_weights'] else init
            lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    return lines + [f"Command: `{entry['command']}`", '']


def _finetuning_cell(cell: Optional[Dict[str, Any]]) -> str:
    if not cell:
        return '-'
    text = f"{cell['mean']:.1f}" + (f" ± {cell['sd']:.1f}" if cell.get('sd') is not None else '') + \
        f" (n={cell['seeds']})"
    gain = cell.get('gain_vs_random')
    if gain:
        text += f" [{gain['mean']:+.1f}" + (f" ± {gain['sd']:.1f}" if gain.get('sd') is not None else '') + ']'
    return text


def _training_section(metadata: Dict[str, str], metrics: Optional[Dict[str, Any]], has_training_config: bool,
                      git_revision: Optional[str], dirty: bool) -> List[str]:
    """"Training": the config hash, the software versions and commit, the weights' source file and the log."""
    if dirty:
        code = f'uncommitted changes on top of git {git_revision[:-len("-dirty")]}'
    else:
        code = f'git {git_revision}' if git_revision else 'git commit unknown'
    lines = ['## Training', '',
             f"- **Training config sha256** (canonical JSON of the parsed config"
             f"{', shipped as `training_config.yaml`' if has_training_config else ''}): "
             f"`{metadata.get('training_config_sha256', 'none')}`",
             f"- **Software:** timm-spot {metadata.get('timm_spot_version')}, timm {metadata.get('timm_version')}, "
             f"torch {metadata.get('torch_version')}; this card from timm-spot {code}",
             f"- **Weights:** `model.safetensors` from the run file with sha256 "
             f"`{metadata.get('source_file_sha256', 'unknown')}` (the same metadata is in the file's header)"]
    if metrics and metrics.get('records'):
        last = metrics.get('last', {})
        shown = ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in list(last.items())[:12])
        lines.append(f"- **Log:** {metrics['records']} records in metrics.jsonl; last: {shown}")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# refresh a shipped card
# ----------------------------------------------------------------------------------------------------------------

def _parse_log_line(body: str) -> Optional[Dict[str, Any]]:
    """The ``metrics`` argument that rendered a card's "Log" line (the run folder is gone; the card kept it)."""
    import re
    m = re.search(r'^- \*\*Log:\*\* (\d+) records in metrics\.jsonl; last: (.*)$', body, re.M)
    if not m:
        return None
    last: Dict[str, Any] = {}
    for part in m.group(2).split(', '):
        key, _, raw = part.partition(' ')
        try:
            val: Any = int(raw)
        except ValueError:
            try:
                val = float(raw)
            except ValueError:
                val = raw
        last[key] = val
    return {'records': int(m.group(1)), 'last': last}


def refresh_card(folder: PathLike, git_revision: Optional[str],
                 data_description: Optional[str] = None) -> str:
    """Re-render the README.md of a shipped ``hub/<model>.<tag>/`` folder from the folder's own files, so that a
    change to the card's text reaches released folders without touching their weights, config or training config.

    Inputs: config.json, the safetensors header's metadata, training_config.yaml (present or not), the
    results file ``hub/results_<tag>.json`` beside the folder (if any), and the current card's ``datasets``,
    ``> **Note**`` lines and "Log" line (the run folder that produced them is not shipped). Returns the new text.
    """
    from ._files import read_safetensors_header
    from .provenance import registry_report

    folder = Path(folder)
    config = json.loads((folder / 'config.json').read_text(encoding='utf-8'))
    header = read_safetensors_header(folder / 'model.safetensors')
    metadata = dict(header.pop('__metadata__', {}))
    name = config['architecture']
    tag = config['pretrained_cfg']['tag']
    old_front, old_body = split_front_matter((folder / 'README.md').read_text(encoding='utf-8'))
    shapes = {k: tuple(v['shape']) for k, v in header.items()}
    img_size = int(metadata['img_size']) if metadata.get('img_size') else None
    registry = registry_report(name, config.get('model_args', {}), shapes, tag=tag, img_size=img_size)
    results_file = folder.parent / f'results_{tag}.json'
    evaluations = normalize_results(results_file, name) if results_file.is_file() else []
    finetuning = finetuning_results(results_file, name) if results_file.is_file() else None
    storage = None
    if metadata.get('storage_check'):
        storage = json.loads(metadata['storage_check'])
    elif metadata.get('storage_dtype'):
        storage = {'dtype': metadata['storage_dtype']}
    notes = [line[4:] for line in old_body.splitlines() if line.startswith('> - ')]
    num_params = sum(math.prod(s) for k, s in shapes.items() if not k.endswith('num_batches_tracked'))
    if data_description is None and (folder / 'training_config.yaml').is_file():
        import yaml
        held = (yaml.safe_load((folder / 'training_config.yaml').read_text(encoding='utf-8')) or {}).get(
            'holdout_per_class')
        if held:
            data_description = (_data_text(metadata.get('training_data'), old_front.get('datasets') or []) +
                                f', minus the last {held} images of each class (held out for evaluation)')
    return render_card(
        name=name, repo_id=metadata.get('hf_hub_id') or f'timm-spot/{name}.{tag}', config=config,
        metadata=metadata, registry=registry, evaluations=evaluations, metrics=_parse_log_line(old_body),
        datasets=old_front.get('datasets'), data_source=metadata.get('training_data'), num_params=num_params,
        warnings=notes, has_training_config=(folder / 'training_config.yaml').is_file(),
        git_revision=git_revision, storage=storage, data_description=data_description, finetuning=finetuning)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m hub.card FOLDER...``: refresh the cards of shipped release folders (README.md only)."""
    import argparse
    import sys
    from .provenance import git_revision

    p = argparse.ArgumentParser(prog='python -m hub.card', description=main.__doc__)
    p.add_argument('folders', nargs='+', help='hub/<model>.<tag>/ folders')
    p.add_argument('--allow-dirty', action='store_true', help='refresh from a tree with uncommitted changes')
    args = p.parse_args(argv)
    rev = git_revision()  # before writing: the cards name the commit they were generated from
    if rev and rev.endswith('-dirty') and not args.allow_dirty:
        print('error: uncommitted changes: commit first (published cards name a clean commit) or pass '
              '--allow-dirty', file=sys.stderr)
        return 2
    for folder in args.folders:
        path = Path(folder) / 'README.md'
        path.write_text(refresh_card(folder, rev), encoding='utf-8')
        print(f'refreshed {path}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

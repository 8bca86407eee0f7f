"""Hub tooling (``hub/``): export a run, load it through a Hugging Face cache offline, publish dry-run.

Everything runs on CPU without network: a fake pretraining run is made from freshly created models, exported with
``hub.export`` as release tag ``spot_test`` (not in the release table, so nothing here depends on which releases
ship; registry loads point the model's cfg at the test repo with ``pretrained_cfg_overlay=dict(hf_hub_id=...)``),
and put into a Hugging Face cache (``hub.cache.build_offline_cache``) in the exact on-disk layout
huggingface_hub reads. ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` are set in the environment AND patched into
``huggingface_hub.constants``: huggingface_hub reads both variables once, at import time (timm imports it at
``import timm``), and its functions use the module constants at call time, so the environment alone is too late.
A socket guard makes any connection attempt fail the test.
"""
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

import timm
import timm_spot  # noqa: F401  (registers the models)
from hub import build_offline_cache, repo_cache_folder, verify_offline_cache
from hub.__main__ import main as hub_main
from hub.card import normalize_results, split_front_matter
from hub.export import BF16_TOLERANCE, EXPORT_FILES, canonical_config_hash, export_run, public_data_source
from hub.publish import publish_folder

MODELS = ('alexnet_spot', 'alexnet_spot_discriminator', 'damage_repair_generator')
OWNER = 'timm-spot'
TAG = 'spot_test'
# as train_scripts/trainer.py writes model_args.json: explicit kwargs per model, plus non-model entries
RUN_ARGS = {
    'alexnet_spot': {},
    'alexnet_spot_discriminator': {'head_kernel_size': 8, 'mask_head': True},
    'damage_repair_generator': {'stem_width': 32, 'widths': [64, 128, 256, 512], 'encoder_kernel_size': 2,
                                'leak': 0.1, 'theta': 0.7, 'fill': 'avg', 'repair': 'distributed', 'gate': True,
                                'bn_momentum': 0.025, 'bn_eps': 0.001},
}
RUN_EXTRA = {'img_size': 128, 'how_to_load': 'timm.create_model(NAME, ...) after `import timm_spot`'}
RESULTS = {
    'conv1': {'top1': 18.25, 'train_top1': 21.0, 'dim': 9600, 'grid': [10, 10]},
    'conv2': {'top1': 27.5}, 'conv3': {'top1': 30.0}, 'conv4': {'top1': 31.5}, 'conv5': {'top1': 29.75},
    '_meta': {'model': 'alexnet_spot', 'img_size': 64, 'n_train': 1000, 'n_val': 500,
              'dataset': 'ILSVRC/imagenet-1k', 'val_split': 'validation'},
}
CONFIG_YAML = """\
data: ILSVRC/imagenet-1k
split: train
img_size: 128
theta: 0.7
stage2_epochs: 150
gen_widths: [64, 128, 256, 512]
output_dir: runs/fake-spot-run
"""


def repo_id(name: str) -> str:
    return f'{OWNER}/{name}.{TAG}'


def folder_of(out: Path, name: str) -> Path:
    """An exported release folder: <out>/<model>.<tag>/, named like its Hub repo."""
    return Path(out) / f'{name}.{TAG}'


def registry_model(name: str, **kwargs):
    """The registered architecture and cfg, its weights from the test repo (what a release row's hf_hub_id does).
    The fake run is a 128-px one: the discriminator's fc6 kernel (8) is passed, as model_args.json says."""
    if name == 'alexnet_spot_discriminator':
        kwargs.setdefault('head_kernel_size', RUN_ARGS[name]['head_kernel_size'])
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=repo_id(name)), **kwargs)


def _fake_state_dict(name: str, seed: int, **kwargs) -> dict:
    """A state dict with the registered model's keys and shapes, filled fast with random values.

    (The models' own initialisers, e.g. the generator's truncated normal, are slow on a busy CPU.)
    """
    g = torch.Generator().manual_seed(seed)
    shapes = timm.create_model(name, device='meta', **kwargs).state_dict()
    out = {}
    for k, v in shapes.items():
        if v.dtype.is_floating_point:
            t = torch.randn(v.shape, generator=g) * 0.05
            out[k] = t.abs() + 0.5 if k.endswith('running_var') else t
        else:
            out[k] = torch.full(v.shape, 7, dtype=v.dtype)
    return out


def make_run(run: Path, model_args: dict, models=MODELS, config: str = CONFIG_YAML) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(models):
        sd = _fake_state_dict(name, seed=i, **model_args.get(name, {}))
        safetensors.torch.save_file(sd, str(run / f'{name}.safetensors'))
    (run / 'model_args.json').write_text(json.dumps({**model_args, **RUN_EXTRA}))
    (run / 'config.yaml').write_text(config)
    (run / 'metrics.jsonl').write_text(
        '\n'.join(json.dumps({'step': s, 'loss_c': 0.7 - s / 100, 'lr': 3e-4}) for s in range(3)) + '\n{"step": 3, "lo')
    return run


# ----------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------

def _fast_trunc_normal_(tensor, mean=0., std=1., a=-2., b=2., generator=None):
    with torch.no_grad():
        return tensor.normal_(mean, std, generator=generator).clamp_(a, b)


def _patch_slow_init(mp: pytest.MonkeyPatch) -> None:
    # torch 2.14's trunc_normal_ resamples whole tensors until no value is out of range: the generator's init then
    # takes ~0.3 s on an idle CPU and several seconds on a busy one. Every test here replaces the initial values
    # with loaded weights (and compares them), so a clamped normal is as good and keeps the module fast.
    mp.setattr(torch.nn.init, 'trunc_normal_', _fast_trunc_normal_)


@pytest.fixture(autouse=True)
def fast_init(monkeypatch):
    _patch_slow_init(monkeypatch)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A fake run exported to <tmp>/hub/<model_name>.spot_test/ (module scope: built once)."""
    root = tmp_path_factory.mktemp('hubexport')
    run = make_run(root / 'fake-spot-run', RUN_ARGS)
    (root / 'results.json').write_text(json.dumps(RESULTS))
    with pytest.MonkeyPatch.context() as mp:
        _patch_slow_init(mp)
        export_run(run, root / 'hub', results=json.loads((root / 'results.json').read_text()), verify=False,
                   log=None, tag=TAG)
    return dict(root=root, run=run, out=root / 'hub')


@pytest.fixture(scope='module')
def hf_cache(exported):
    cache = exported['root'] / 'hf_home' / 'hub'
    for name in MODELS:
        build_offline_cache(folder_of(exported['out'], name), repo_id(name), cache)
    return cache


def _no_network(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args[1:] if args else kwargs}')


def use_cache(monkeypatch, cache: Path) -> Path:
    """Point huggingface_hub at ``cache``, offline, and forbid sockets."""
    import huggingface_hub.constants as hf_constants
    home = cache.parent
    monkeypatch.setenv('HF_HOME', str(home))
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(hf_constants, 'HF_HOME', str(home))
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(socket.socket, 'connect', _no_network)
    monkeypatch.setattr(socket, 'getaddrinfo', _no_network)
    return cache


@pytest.fixture
def offline(monkeypatch, hf_cache):
    return use_cache(monkeypatch, hf_cache)


def exported_tensors(exported, name, upcast=True):
    """The exported tensors; bfloat16 ones (pretext models) upcast to float32, as timm's load does (exact)."""
    sd = safetensors.torch.load_file(str(folder_of(exported['out'], name) / 'model.safetensors'))
    return {k: v.float() if upcast and v.dtype == torch.bfloat16 else v for k, v in sd.items()}


def assert_same_tensors(state: dict, ref: dict, skip=()) -> None:
    keys = [k for k in ref if not any(k.startswith(s) for s in skip)]
    assert keys
    for k in keys:
        assert k in state, k
        assert state[k].dtype == ref[k].dtype, k
        assert torch.equal(state[k], ref[k]), f'{k} differs'


def _isolated_repo_cache(tmp_path, hf_cache, name):
    """A fresh cache holding a copy of one repo (symlinks kept: they are relative), for destructive tests."""
    cache = tmp_path / 'hf_home' / 'hub'
    src = repo_cache_folder(hf_cache, repo_id(name))
    shutil.copytree(src, repo_cache_folder(cache, repo_id(name)), symlinks=True)
    return cache


def _weights_blob(cache, name) -> Path:
    storage = repo_cache_folder(cache, repo_id(name))
    commit = (storage / 'refs' / 'main').read_text()
    return (storage / 'snapshots' / commit / 'model.safetensors').resolve()


# ----------------------------------------------------------------------------------------------------------------
# cache layout
# ----------------------------------------------------------------------------------------------------------------

def test_cache_layout_is_what_huggingface_hub_reads(exported, hf_cache):
    from huggingface_hub import scan_cache_dir
    info = scan_cache_dir(hf_cache)
    assert not info.warnings, info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {repo_id(n) for n in MODELS}
    for name in MODELS:
        repo = repos[repo_id(name)]
        assert repo.repo_type == 'model'
        (rev,) = repo.revisions
        assert rev.refs == frozenset({'main'})
        assert {f.file_name for f in rev.files} == set(EXPORT_FILES)
        storage = repo_cache_folder(hf_cache, repo_id(name))
        ref = (storage / 'refs' / 'main').read_text()
        assert ref == rev.commit_hash and len(ref) == 40  # no trailing newline: huggingface_hub reads it verbatim
        pointer = storage / 'snapshots' / ref / 'model.safetensors'
        assert pointer.is_symlink() and not os.path.isabs(os.readlink(pointer))
        sha = hashlib.sha256((folder_of(exported['out'], name) / 'model.safetensors').read_bytes()).hexdigest()
        assert os.readlink(pointer) == f'../../blobs/{sha}'  # LFS files: blob named by sha256
        assert verify_offline_cache(hf_cache, repo_id(name)) == []


# ----------------------------------------------------------------------------------------------------------------
# loading through timm, offline
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', MODELS)
def test_registry_pretrained_loads_exported_tensors(offline, exported, name):
    model = registry_model(name)
    ref = exported_tensors(exported, name)
    state = model.state_dict()
    assert set(state) == set(ref)
    assert_same_tensors(state, ref)


@pytest.mark.parametrize('name', MODELS)
def test_features_only_loads_exported_tensors(offline, exported, name):
    model = registry_model(name, features_only=True)
    ref = {k.replace('.', '_', 1): v for k, v in exported_tensors(exported, name).items()}  # FeatureListNet names
    state = model.state_dict()
    assert state and set(state) <= set(ref)
    assert_same_tensors(ref, state)  # every feature tensor is the exported one
    outs = model(torch.zeros(1, 3, 64, 64))
    assert len(outs) == len(model.feature_info.channels()) == 5


def test_in_chans_1_conv1_is_channel_sum(offline, exported):
    model = registry_model('alexnet_spot', in_chans=1)
    ref = exported_tensors(exported, 'alexnet_spot')
    state = model.state_dict()
    assert torch.allclose(state['features.conv1.weight'], ref['features.conv1.weight'].sum(dim=1, keepdim=True))
    assert_same_tensors(state, {k: v for k, v in ref.items() if k != 'features.conv1.weight'})
    assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 256)


def test_in_chans_1_generator_adapts_input_and_output_convs(offline, exported):
    # an image-to-image model: timm adapts the input conv (channel sum), the model's filter the output conv
    # (to_rgb has in_chans outputs: a gray output is the mean of the R, G, B filters); timm's own
    # test_model_load_pretrained creates every pretrained model with in_chans=1
    model = registry_model('damage_repair_generator', in_chans=1).eval()
    ref = exported_tensors(exported, 'damage_repair_generator')
    state = model.state_dict()
    assert torch.allclose(state['encoder.0.conv.weight'], ref['encoder.0.conv.weight'].sum(dim=1, keepdim=True))
    assert torch.allclose(state['to_rgb.weight'], ref['to_rgb.weight'].mean(dim=0, keepdim=True))
    assert torch.allclose(state['to_rgb.bias'], ref['to_rgb.bias'].mean(dim=0, keepdim=True))
    with torch.no_grad():
        assert model.autoencode(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)


@pytest.mark.parametrize('name', ['alexnet_spot', 'alexnet_spot_discriminator'])
def test_num_classes_5_keeps_backbone_new_head(offline, exported, name):
    model = registry_model(name, num_classes=5).eval()
    ref = exported_tensors(exported, name)
    assert_same_tensors(model.state_dict(), ref, skip=('head.fc.',))
    assert model.get_classifier().out_features == 5
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 128, 128)).shape == (2, 5)


@pytest.mark.parametrize('name', MODELS)
def test_hf_hub_name_loads_exported_tensors_and_config(offline, exported, name):
    model = timm.create_model(f'hf-hub:{repo_id(name)}', pretrained=True)
    ref = exported_tensors(exported, name)
    assert set(model.state_dict()) == set(ref)
    assert_same_tensors(model.state_dict(), ref)
    config = json.loads((folder_of(exported['out'], name) / 'config.json').read_text())
    cfg = model.pretrained_cfg
    assert cfg['hf_hub_id'] == repo_id(name) and cfg['source'] == 'hf-hub'
    for key in ('mean', 'std', 'input_size', 'crop_pct', 'interpolation'):
        assert tuple(cfg[key]) == tuple(config['pretrained_cfg'][key]) if isinstance(cfg[key], (list, tuple)) \
            else cfg[key] == config['pretrained_cfg'][key]
    if name == 'damage_repair_generator':
        assert model.theta == 0.7 and model.fill == 'avg'  # model_args travel through config.json


def test_hf_hub_name_without_pretrained_builds_only_the_architecture(offline, exported):
    model = timm.create_model(f'hf-hub:{repo_id("alexnet_spot")}')  # reads config.json, loads NO weights
    assert type(model).__name__ == 'AlexNetSpot' and model.num_classes == 0
    ref = exported_tensors(exported, 'alexnet_spot')
    assert not torch.equal(model.state_dict()['features.conv1.weight'], ref['features.conv1.weight'])


def test_pinned_revision_resolves_from_snapshot(monkeypatch, tmp_path, exported):
    commit = '0123456789abcdef0123456789abcdef01234567'
    cache = tmp_path / 'hf_home' / 'hub'
    build_offline_cache(folder_of(exported['out'], 'alexnet_spot'), repo_id('alexnet_spot'), cache, commit=commit,
                        ref=None)
    use_cache(monkeypatch, cache)
    ref = exported_tensors(exported, 'alexnet_spot')
    pinned = f'{repo_id("alexnet_spot")}@{commit}'
    # by name, and through a default cfg's hf_hub_id (what the proposed timm_spot diff writes)
    assert_same_tensors(timm.create_model(f'hf-hub:{pinned}', pretrained=True).state_dict(), ref)
    m = timm.create_model('alexnet_spot', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id=pinned))
    assert_same_tensors(m.state_dict(), ref)
    with pytest.raises(RuntimeError, match='alexnet_spot'):  # no refs/main here: only the pinned id resolves
        registry_model('alexnet_spot')
    # a cached commit sha is immutable: huggingface_hub returns it without any request even when not offline
    import huggingface_hub.constants as hf_constants
    monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.delenv('HF_HUB_OFFLINE')
    assert_same_tensors(timm.create_model(f'hf-hub:{pinned}', pretrained=True).state_dict(), ref)  # socket guard on


# ----------------------------------------------------------------------------------------------------------------
# broken caches
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('how', ['truncated', 'garbage_header'])
@pytest.mark.parametrize('via', ['registry', 'hf-hub'])
def test_broken_weights_in_cache_is_a_clear_error(monkeypatch, tmp_path, hf_cache, how, via):
    cache = _isolated_repo_cache(tmp_path, hf_cache, 'alexnet_spot')
    blob = _weights_blob(cache, 'alexnet_spot')
    data = blob.read_bytes()
    blob.write_bytes(data[:len(data) // 2] if how == 'truncated' else b'\xff' * 64 + data[64:])
    use_cache(monkeypatch, cache)
    with pytest.raises(RuntimeError) as e:
        if via == 'registry':
            registry_model('alexnet_spot')
        else:
            timm.create_model(f'hf-hub:{repo_id("alexnet_spot")}', pretrained=True)
    msg = str(e.value)
    assert 'alexnet_spot' in msg and repo_id('alexnet_spot') in msg and 'could not load pretrained weights' in msg
    assert any('does not match its content' in p for p in verify_offline_cache(cache, repo_id('alexnet_spot')))


def test_broken_weights_error_names_the_hf_hub_repo_actually_used(monkeypatch, tmp_path, exported):
    other = 'someone/alexnet_spot.custom'
    cache = build_offline_cache(folder_of(exported['out'], 'alexnet_spot'), other, tmp_path / 'hf_home' / 'hub')
    storage = repo_cache_folder(cache, other)
    blob = (storage / 'snapshots' / (storage / 'refs' / 'main').read_text() / 'model.safetensors').resolve()
    blob.write_bytes(blob.read_bytes()[:1000])
    use_cache(monkeypatch, cache)
    with pytest.raises(RuntimeError, match=other):
        timm.create_model(f'hf-hub:{other}', pretrained=True)


def test_missing_weights_in_cache_is_a_clear_error(monkeypatch, tmp_path, hf_cache):
    cache = _isolated_repo_cache(tmp_path, hf_cache, 'alexnet_spot')
    storage = repo_cache_folder(cache, repo_id('alexnet_spot'))
    (storage / 'snapshots' / (storage / 'refs' / 'main').read_text() / 'model.safetensors').unlink()
    use_cache(monkeypatch, cache)
    with pytest.raises(RuntimeError, match=r"(?s)alexnet_spot.*pretrained_cfg_overlay=dict\(file="):
        registry_model('alexnet_spot')


def test_flipped_byte_loads_silently_but_verify_cache_finds_it(monkeypatch, tmp_path, hf_cache, exported):
    cache = _isolated_repo_cache(tmp_path, hf_cache, 'alexnet_spot')
    blob = _weights_blob(cache, 'alexnet_spot')
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x40  # inside the tensor data: the header stays valid
    blob.write_bytes(bytes(data))
    use_cache(monkeypatch, cache)
    state = registry_model('alexnet_spot').state_dict()
    ref = exported_tensors(exported, 'alexnet_spot')
    assert any(not torch.equal(state[k], ref[k]) for k in ref)  # huggingface_hub does not re-hash cached blobs
    assert verify_offline_cache(cache, repo_id('alexnet_spot'))
    assert hub_main(['verify-cache', '--repo-id', repo_id('alexnet_spot'), '--cache-dir', str(cache)]) == 1


# ----------------------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------------------

def test_export_folder_config_metadata_and_card(exported):
    import timm_spot as ts
    expected_hash = canonical_config_hash(yaml.safe_load(CONFIG_YAML))
    for name in MODELS:
        folder = folder_of(exported['out'], name)
        assert sorted(p.name for p in folder.iterdir()) == sorted(EXPORT_FILES)  # exactly the repo's files
        config = json.loads((folder / 'config.json').read_text())
        ref = timm.create_model(name, device='meta')
        assert config['architecture'] == name
        assert config['num_classes'] == ref.num_classes and config['num_features'] == ref.num_features
        assert config['model_args'] == {**RUN_ARGS.get(name, {}), 'in_chans': 3, 'num_classes': ref.num_classes,
                                        'global_pool': 'avg'}
        pcfg = config['pretrained_cfg']
        assert pcfg['input_size'] == [3, 128, 128] and pcfg['license'] == 'mit' and pcfg['num_classes'] == ref.num_classes
        assert pcfg['mean'] == list(ref.pretrained_cfg['mean']) and pcfg['std'] == list(ref.pretrained_cfg['std'])
        assert not {'hf_hub_id', 'url', 'file', 'source', 'state_dict'} & set(pcfg)

        with safetensors.safe_open(str(folder / 'model.safetensors'), 'pt') as f:
            meta = f.metadata()
        assert meta['format'] == 'pt' and meta['architecture'] == name
        assert meta['training_run'] == 'fake-spot-run' and meta['training_config_sha256'] == expected_hash
        assert meta['timm_spot_version'] == ts.__version__ and meta['training_data'] == 'ILSVRC/imagenet-1k'
        assert json.loads(meta['model_args']) == RUN_ARGS.get(name, {})
        assert meta['pretrained_tag'] == TAG and meta['hf_hub_id'] == repo_id(name)
        # storage: the backbone float32; the pretext models bfloat16, their outputs checked against float32
        with safetensors.safe_open(str(folder / 'model.safetensors'), 'pt') as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        if name == 'alexnet_spot':
            assert meta['storage_dtype'] == 'float32' and 'F32' in dtypes and dtypes <= {'F32', 'I64'}
        else:
            check = json.loads(meta['storage_check'])
            assert meta['storage_dtype'] == 'bfloat16' and 'BF16' in dtypes and 'F32' not in dtypes
            assert 0 < max(check['max_abs_diff'].values()) <= check['tolerance'] == BF16_TOLERANCE[name]
        assert meta['source_file_sha256'] == hashlib.sha256(
            (exported['run'] / f'{name}.safetensors').read_bytes()).hexdigest()
        assert (folder / 'training_config.yaml').read_text() == CONFIG_YAML

        front, body = split_front_matter((folder / 'README.md').read_text())
        assert front['library_name'] == 'timm' and front['license'] == 'mit'
        assert {'timm', 'self-supervised'} <= set(front['tags'])
        # a pipeline tag only where forward() does what it promises: the generator's model(x) is a pooled 3-vector
        assert front.get('pipeline_tag') == {'alexnet_spot': 'image-feature-extraction',
                                             'alexnet_spot_discriminator': 'image-classification'}.get(name)
        assert front['datasets'] == ['ILSVRC/imagenet-1k']
        assert f"timm.create_model('hf-hub:{repo_id(name)}', pretrained=True)" in body
        assert f"timm.create_model('{name}.{TAG}', pretrained=True)" in body and 'import timm_spot' in body
        assert f'local-dir:hub/{name}.{TAG}' in body and 'python -m hub cache --all' in body
        assert 'Reported in the paper' in body and '| ImageNet: ours (paper) | 19.5 | 33.3 | 37.9 | 38.9 | 34.9 |' in body
    front, body = split_front_matter((folder_of(exported['out'], 'alexnet_spot') / 'README.md').read_text())
    assert front['pipeline_tag'] == 'image-feature-extraction'
    (entry,) = front['model-index']
    assert entry['name'] == f'alexnet_spot.{TAG}'
    (result,) = entry['results']
    assert result['dataset'] == {'name': 'ILSVRC/imagenet-1k', 'type': 'ILSVRC/imagenet-1k', 'split': 'validation'}
    assert 'timm-spot measurement' in result['task']['name']
    values = {m['name'].split()[0]: m['value'] for m in result['metrics']}
    assert values == {k: v['top1'] for k, v in RESULTS.items() if not k.startswith('_')}
    assert all(m['verified'] is False and 'measured by timm-spot' in m['name'] for m in result['metrics'])
    assert 'Measured by this project' in body and '| 18.25 | 27.50 | 30.00 | 31.50 | 29.75 |' in body
    # results belong to the backbone: the pretext models' cards carry none
    front, body = split_front_matter((folder_of(exported['out'], 'alexnet_spot_discriminator') / 'README.md').read_text())
    assert 'model-index' not in front
    assert '**Storage:** bfloat16' in body


def test_pretext_storage_falls_back_to_float32_beyond_the_tolerance(tmp_path, monkeypatch):
    import hub.export as export_mod
    name = 'damage_repair_generator'
    run = make_run(tmp_path / 'run', RUN_ARGS, models=(name,))
    monkeypatch.setitem(export_mod.BF16_TOLERANCE, name, 1e-9)  # no bfloat16 copy can be this close
    with pytest.raises(RuntimeError, match='--pretext-dtype auto or float32'):
        export_run(run, tmp_path / 'hub', log=None, tag=TAG, verify=False, pretext_dtype='bfloat16')
    (result,) = export_run(run, tmp_path / 'hub', log=None, tag=TAG, verify=False)  # default: auto
    assert result.metadata['storage_dtype'] == 'float32' and any('stored in float32' in w for w in result.warnings)
    with safetensors.safe_open(str(result.folder / 'model.safetensors'), 'pt') as f:
        assert 'BF16' not in {f.get_slice(k).get_dtype() for k in f.keys()}


def test_export_records_data_paths_without_machine_paths(tmp_path, monkeypatch):
    config = CONFIG_YAML.replace('data: ILSVRC/imagenet-1k', 'data: ../../somewhere/data/cifar10/train.parquet')
    run = make_run(tmp_path / 'run', {}, models=('alexnet_spot',), config=config)
    monkeypatch.delenv('TIMM_SPOT_DATA', raising=False)
    (result,) = export_run(run, tmp_path / 'hub', log=None, tag=TAG)
    shipped = (result.folder / 'training_config.yaml').read_text()
    assert 'data: local:cifar10/train.parquet' in shipped and 'somewhere' not in shipped
    assert result.metadata['training_data'] == 'local:cifar10/train.parquet'
    assert result.metadata['training_config_sha256'] == canonical_config_hash(yaml.safe_load(shipped))
    assert 'somewhere' not in (result.folder / 'README.md').read_text()
    monkeypatch.setenv('TIMM_SPOT_DATA', str(tmp_path / 'data'))
    (tmp_path / 'data' / 'cifar10').mkdir(parents=True)
    assert public_data_source(str(tmp_path / 'data' / 'cifar10' / 'train.parquet')) == \
        '$TIMM_SPOT_DATA/cifar10/train.parquet'
    assert public_data_source('uoft-cs/cifar10') == 'uoft-cs/cifar10' and public_data_source('builtin') == 'builtin'


@pytest.mark.slow
def test_export_cli_is_reproducible_and_verified(exported, tmp_path):
    out = tmp_path / 'hub'
    args = ['export', str(exported['run']), '--out', str(out), '--models', 'alexnet_spot,damage_repair_generator',
            '--results', str(exported['root'] / 'results.json'), '--tag', TAG]
    assert hub_main(args) == 0  # verifies by loading the folder back through timm (local-dir:)
    first = {p.name: p.read_bytes() for p in folder_of(out, 'alexnet_spot').iterdir()}
    assert hub_main(args) == 0
    second = {p.name: p.read_bytes() for p in folder_of(out, 'alexnet_spot').iterdir()}
    assert first == second  # byte-identical (safetensors metadata order is canonicalised)
    assert first['model.safetensors'] == (folder_of(exported['out'], 'alexnet_spot') / 'model.safetensors').read_bytes()
    gen = folder_of(out, 'damage_repair_generator') / 'model.safetensors'  # bfloat16, also reproducible
    assert gen.read_bytes() == (folder_of(exported['out'], 'damage_repair_generator') / 'model.safetensors').read_bytes()
    (folder_of(out, 'alexnet_spot') / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='--force'):
        hub_main(args)


def test_export_rejects_weights_that_do_not_fit_model_args(tmp_path):
    run = make_run(tmp_path / 'run', {'alexnet_spot': {}}, models=('alexnet_spot',))
    (run / 'model_args.json').write_text(json.dumps({'alexnet_spot': {'norm5': True}}))
    with pytest.raises(RuntimeError, match=r'(?s)alexnet_spot.*do not fit.*norm5'):
        export_run(run, tmp_path / 'hub', log=None, tag=TAG)
    (run / 'model_args.json').write_text(json.dumps({'alexnet_spot': {'pretrained': True}}))
    with pytest.raises(ValueError, match='loading options'):
        export_run(run, tmp_path / 'hub', log=None, tag=TAG)


def test_nondefault_model_args_load_via_hf_hub_only(monkeypatch, tmp_path, capsys):
    name = 'alexnet_spot_discriminator'
    args = {name: {'head_kernel_size': 2, 'head_hidden_size': 64}}  # at 64 px the tag's cfg derives kernel 4
    run = make_run(tmp_path / 'run', args, models=(name,), config=CONFIG_YAML.replace('img_size: 128', 'img_size: 64'))
    (run / 'model_args.json').write_text(json.dumps({**args, 'img_size': 64}))
    (result,) = export_run(run, tmp_path / 'hub', log=None, tag=TAG)
    assert not result.registry['loadable'] and result.registry['nondefault_args']['head_kernel_size'] == \
        {'exported': 2, 'registry': 4}
    assert result.config['model_args']['head_kernel_size'] == 2
    assert result.config['pretrained_cfg']['input_size'] == [3, 64, 64]
    front, body = split_front_matter((result.folder / 'README.md').read_text())
    assert f"model = timm.create_model('hf-hub:{repo_id(name)}', pretrained=True)" in body
    assert 'does NOT load these weights' in body

    cache = build_offline_cache(result.folder, repo_id(name), tmp_path / 'hf_home' / 'hub')
    use_cache(monkeypatch, cache)
    ref = {k: v.float() if v.dtype == torch.bfloat16 else v
           for k, v in safetensors.torch.load_file(str(result.folder / 'model.safetensors')).items()}
    model = timm.create_model(f'hf-hub:{repo_id(name)}', pretrained=True)
    assert_same_tensors(model.state_dict(), ref)
    with pytest.raises(RuntimeError, match='do not match alexnet_spot_discriminator'):
        registry_model(name)


def test_publish_under_the_registry_repo_with_other_args_is_refused(tmp_path):
    # alexnet_spot.spot_c10_64 is a release: its repo is what timm.create_model('alexnet_spot.spot_c10_64',
    # pretrained=True) loads, so weights that need other constructor args must not be published there
    run = make_run(tmp_path / 'run', {'alexnet_spot': {'norm5': True}}, models=('alexnet_spot',))
    (result,) = export_run(run, tmp_path / 'hub', log=None, tag='spot_c10_64')
    assert result.folder.name == 'alexnet_spot.spot_c10_64' and not result.registry['loadable']
    with pytest.raises(RuntimeError, match='--force'):
        publish_folder(result.folder, 'timm-spot/alexnet_spot.spot_c10_64', api=FakeApi(), log=None)


def test_demo_run_is_flagged_and_not_published_as_in1k(tmp_path):
    config = CONFIG_YAML.replace('data: ILSVRC/imagenet-1k', 'data: builtin')
    run = make_run(tmp_path / 'run', {}, models=('alexnet_spot',), config=config)
    (result,) = export_run(run, tmp_path / 'hub', log=None, tag='spot_in1k')  # an ImageNet tag: no release has one
    assert any('builtin' in w for w in result.warnings)
    assert any('not in the release table' in w for w in result.warnings)
    front, body = split_front_matter((result.folder / 'README.md').read_text())
    assert 'do not publish them as timm-spot/alexnet_spot.spot_in1k' in body
    assert 'datasets' not in front  # the demo photos are no Hub dataset: no claim
    api = FakeApi()
    assert publish_folder(result.folder, 'me/alexnet_spot.demo', api=api, log=None)['commit'] == FakeApi.oid


# ----------------------------------------------------------------------------------------------------------------
# publish
# ----------------------------------------------------------------------------------------------------------------

class FakeApi:
    oid = 'c0ffee' * 6 + 'c0ff'

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(('create_repo', repo_id, kwargs))
        return type('RepoUrl', (), {'repo_id': repo_id})()

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(('create_branch', repo_id, kwargs))

    def create_commit(self, **kwargs):
        self.calls.append(('create_commit', kwargs['repo_id'], kwargs))
        return type('CommitInfo', (), {'oid': self.oid, 'commit_url': f'https://hf.co/x/commit/{self.oid}',
                                       'pr_url': None})()


def test_publish_dry_run_lists_files_without_network(monkeypatch, exported, capsys):
    import huggingface_hub

    class NoApi:
        def __init__(self, *a, **k):
            raise AssertionError('HfApi must not be created in a dry run')

    monkeypatch.setattr(huggingface_hub, 'HfApi', NoApi)
    monkeypatch.setattr(socket.socket, 'connect', _no_network)
    monkeypatch.setattr(socket, 'getaddrinfo', _no_network)
    monkeypatch.delenv('HF_TOKEN', raising=False)
    folder = folder_of(exported['out'], 'alexnet_spot')
    assert hub_main(['publish', str(folder), '--repo-id', repo_id('alexnet_spot'), '--dry-run']) == 0
    out = capsys.readouterr().out
    assert 'DRY RUN' in out and 'no network' in out
    for name in EXPORT_FILES:
        data = (folder / name).read_bytes()
        line = next(l for l in out.splitlines() if l.strip().startswith(name))
        assert f'{len(data):,d} B' in line and hashlib.sha256(data).hexdigest() in line
    assert f"Release('alexnet_spot', '{TAG}', <img_size>, published=True, revision='<commit sha>')" in out


@pytest.mark.parametrize('revision', ['main', 'dev'])
def test_publish_uploads_and_prints_revision_to_pin(exported, capsys, revision):
    api = FakeApi()
    folder = folder_of(exported['out'], 'alexnet_spot')
    summary = publish_folder(folder, repo_id('alexnet_spot'), revision=revision, api=api)
    kinds = [c[0] for c in api.calls]
    assert kinds == (['create_repo', 'create_commit'] if revision == 'main'
                     else ['create_repo', 'create_branch', 'create_commit'])
    assert api.calls[0][2]['exist_ok'] is True
    upload = api.calls[-1][2]
    assert sorted(op.path_in_repo for op in upload['operations']) == sorted(EXPORT_FILES)
    assert {op.path_or_fileobj for op in upload['operations']} == {str(folder / n) for n in EXPORT_FILES}
    assert upload['revision'] == revision
    assert summary['commit'] == FakeApi.oid
    out = capsys.readouterr().out
    assert f'revision to pin: {FakeApi.oid}' in out
    assert f"Release('alexnet_spot', '{TAG}', <img_size>, published=True, revision='{FakeApi.oid}')," in out
    assert f"timm.create_model('hf-hub:timm-spot/alexnet_spot.{TAG}@{FakeApi.oid}', pretrained=True)" in out


def test_publish_without_token_fails_before_any_request(monkeypatch, exported):
    import huggingface_hub
    monkeypatch.delenv('HF_TOKEN', raising=False)
    monkeypatch.setattr(huggingface_hub, 'get_token', lambda: None)
    monkeypatch.setattr(socket.socket, 'connect', _no_network)
    with pytest.raises(RuntimeError, match='HF_TOKEN'):
        publish_folder(folder_of(exported['out'], 'alexnet_spot'), repo_id('alexnet_spot'), log=None)


def test_publish_refuses_broken_folder(tmp_path, exported):
    folder = tmp_path / 'alexnet_spot'
    shutil.copytree(folder_of(exported['out'], 'alexnet_spot'), folder)
    (folder / 'README.md').write_text('no front matter')
    data = (folder / 'model.safetensors').read_bytes()
    (folder / 'model.safetensors').write_bytes(data[:1000])
    with pytest.raises(ValueError, match=r'(?s)not ready to publish.*model.safetensors.*README.md'):
        publish_folder(folder, repo_id('alexnet_spot'), dry_run=True, log=None)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------

def test_cache_cli_with_published_commit(tmp_path, exported, capsys):
    commit = 'ab' * 20
    cache = tmp_path / 'cache'
    folder = folder_of(exported['out'], 'alexnet_spot')
    assert hub_main(['cache', str(folder), '--repo-id', repo_id('alexnet_spot'), '--cache-dir', str(cache),
                     '--commit', commit, '--copy']) == 0
    assert 'HF_HUB_OFFLINE=1' in capsys.readouterr().out
    storage = repo_cache_folder(cache, repo_id('alexnet_spot'))
    assert (storage / 'refs' / 'main').read_text() == commit
    assert not (storage / 'snapshots' / commit / 'config.json').is_symlink()
    assert verify_offline_cache(cache, repo_id('alexnet_spot'), revision=commit) == []
    with pytest.raises(ValueError, match='40-character'):
        build_offline_cache(folder, repo_id('alexnet_spot'), cache, commit='abc')


def test_results_layouts():
    (ev,) = normalize_results(RESULTS, 'alexnet_spot')
    assert ev['layers'] == {'conv1': 18.25, 'conv2': 27.5, 'conv3': 30.0, 'conv4': 31.5, 'conv5': 29.75}
    assert ev['dataset']['split'] == 'validation' and ev['notes']['img_size'] == 64
    listed = {'evaluations': [{'dataset': {'name': 'STL-10', 'type': 'tanganke/stl10', 'split': 'test'},
                               'layers': {'conv5': 70.1}}]}
    assert normalize_results({'alexnet_spot': listed}, 'alexnet_spot')[0]['dataset']['type'] == 'tanganke/stl10'
    assert normalize_results({'alexnet_spot': listed}, 'damage_repair_generator') == []
    assert normalize_results(RESULTS, 'alexnet_spot_discriminator') == []
    with pytest.raises(ValueError, match='percentage'):
        normalize_results({'conv1': {'top1': 180.0}}, 'alexnet_spot')
    with pytest.raises(ValueError, match='no per-layer'):
        normalize_results({'_meta': {}}, 'alexnet_spot')

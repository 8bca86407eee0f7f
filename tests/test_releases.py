"""The released weights: every tag timm lists as pretrained ships in hub/<model>.<tag>/, loads offline through timm's
real Hub code path from a cache seeded by ``python -m hub cache --all``, and is what its card says it is; and
``pretrained=True`` without weights fails fast with a message that says where the weights are.

The release table is timm_spot/models/_releases.py: adding a row without its folder (or a folder without its row)
fails here, so no tag claims weights that do not exist.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import timm_spot  # noqa: F401
from hub.cache import shipped_releases
from hub.card import split_front_matter
from test_hub_offline import use_cache
from timm_spot.models import _spot_builder
from timm_spot.models._releases import HUB_OWNER, RELEASES, find_release

REPO = Path(__file__).resolve().parents[1]
HUB = REPO / 'hub'
OUR_MODELS = ('alexnet_spot', 'alexnet_spot_discriminator', 'damage_repair_generator')
PRETRAINED = timm.list_models(list(OUR_MODELS), pretrained=True)
# what one release adds to git: well under 100 MB (64-px release: about 65 MB with both pretext models in
# bfloat16, 82 MB if the generator has to stay float32)
RELEASE_BUDGET_MB = 85


def _load_folder(folder: Path) -> dict:
    sd = safetensors.torch.load_file(str(folder / 'model.safetensors'))
    return {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in sd.items()}


def test_every_pretrained_tag_ships_its_folder_and_every_folder_is_a_release():
    rows = {r.name for r in RELEASES}
    assert set(PRETRAINED) == rows, 'timm lists exactly the release table as pretrained'
    folders = {f.name for f, _, _ in shipped_releases(HUB)}
    assert rows - folders == set(), f'release rows without a folder in hub/: {sorted(rows - folders)}'
    assert folders - rows == set(), f'folders in hub/ without a release row: {sorted(folders - rows)}'
    for name in PRETRAINED:
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.hf_hub_id.split('@')[0] == f'{HUB_OWNER}/{name}'


def test_each_model_defaults_to_its_first_release():
    for model in OUR_MODELS:
        rel = find_release(model, None)
        cfg = timm.create_model(model, device='meta').pretrained_cfg
        if rel is None:  # no release: the paper's architecture, no weights claimed
            assert not cfg.get('hf_hub_id') and not cfg.get('url') and not cfg.get('file')
        else:
            assert cfg['tag'] == rel.tag and cfg['input_size'] == (3, rel.img_size, rel.img_size)


@pytest.mark.parametrize('rel', RELEASES, ids=[r.name for r in RELEASES])
def test_release_folder_matches_its_row(rel):
    folder = HUB / rel.name
    for f in ('model.safetensors', 'config.json', 'README.md'):
        assert (folder / f).is_file(), f'{folder}/{f} missing'
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == rel.model
    assert config['pretrained_cfg']['tag'] == rel.tag
    assert config['pretrained_cfg']['input_size'] == [3, rel.img_size, rel.img_size]
    with safetensors.safe_open(str(folder / 'model.safetensors'), 'pt') as f:
        meta = f.metadata()
    assert meta['architecture'] == rel.model and meta['pretrained_tag'] == rel.tag
    assert meta['hf_hub_id'] == rel.repo_id
    front, _ = split_front_matter((folder / 'README.md').read_text())
    assert front['library_name'] == 'timm'
    # the backbone is float32 (bit-exact); pretext models may be bfloat16 (output-checked at export)
    if rel.model == 'alexnet_spot':
        assert meta.get('storage_dtype', 'float32') == 'float32'


@pytest.mark.parametrize('tag', sorted({r.tag for r in RELEASES}))
def test_release_size_budget(tag):
    size = sum((f / 'model.safetensors').stat().st_size for f, _, _ in shipped_releases(HUB) if f.name.endswith(tag))
    assert size < RELEASE_BUDGET_MB * 1e6, f'release {tag} adds {size / 1e6:.1f} MB of weights to git'


@pytest.fixture(scope='module')
def seeded_cache(tmp_path_factory):
    """A Hugging Face cache made by exactly `python -m hub cache --all --cache-dir DIR`."""
    cache = tmp_path_factory.mktemp('hf') / 'hub'
    subprocess.run([sys.executable, '-m', 'hub', 'cache', '--all', '--cache-dir', str(cache)], cwd=REPO,
                   check=True, capture_output=True, text=True)
    return cache


@pytest.mark.slow
@pytest.mark.parametrize('name', PRETRAINED)
def test_release_loads_by_tag_and_hf_hub_name_offline(monkeypatch, seeded_cache, name):
    use_cache(monkeypatch, seeded_cache)
    model_name, tag = name.split('.', 1)
    rel = find_release(model_name, tag)
    ref = _load_folder(HUB / name)
    for created in (name, f'hf-hub:{rel.repo_id}'):
        model = timm.create_model(created, pretrained=True).eval()
        state = model.state_dict()
        assert set(state) == set(ref)
        for k, v in state.items():
            assert torch.equal(v, ref[k]), (created, k)
        assert model.pretrained_cfg['input_size'] == (3, rel.img_size, rel.img_size)


def test_first_backbone_release_is_what_the_card_says():
    folder = HUB / 'alexnet_spot.spot_c10_64'
    if not folder.is_dir():
        pytest.skip('alexnet_spot.spot_c10_64 is no longer shipped')
    meta, body = split_front_matter((folder / 'README.md').read_text())
    assert meta['model-index'][0]['name'] == 'alexnet_spot.spot_c10_64'
    with safetensors.safe_open(str(folder / 'model.safetensors'), 'pt') as f:
        header = f.metadata()
    assert header['pretrained_tag'] == 'spot_c10_64' and 'cifar10' in header['training_data']
    model = timm.create_model('local-dir:' + str(folder), pretrained=True).eval()
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 256) and torch.isfinite(feats).all()


# ----------------------------------------------------------------------------------------------------------------
# pretrained=True without the weights: a fast, clear error
# ----------------------------------------------------------------------------------------------------------------

def _assert_routes(msg: str, rel) -> None:
    assert rel.repo_id in msg and rel.tag in msg
    assert ('is published on the Hub' if rel.published else 'is not published on the Hub yet') in msg
    assert f"local-dir:hub/{rel.name}" in msg
    assert 'python -m hub cache --all' in msg
    assert f"pretrained_cfg_overlay=dict(file='hub/{rel.name}/model.safetensors')" in msg
    # routes without a checkout (pip users): the Hub repo id, a local copy of its files, the weights file alone
    assert f"hf-hub:{rel.repo_id}" in msg and "local-dir:DIR" in msg and "file='DIR/model.safetensors'" in msg


@pytest.mark.parametrize('how', ['HF_HUB_OFFLINE', 'unreachable'])
def test_uncached_release_offline_fails_fast_with_the_routes(monkeypatch, tmp_path, how):
    import huggingface_hub.constants as hf_constants
    import socket
    rel = RELEASES[0]
    monkeypatch.setattr(hf_constants, 'HF_HUB_CACHE', str(tmp_path / 'empty'))
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'empty'))
    if how == 'HF_HUB_OFFLINE':
        monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', True)
        monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    else:  # not told: one connection attempt finds the Hub unreachable, no huggingface_hub retries
        monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', False)
        monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
        for var in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy'):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(_spot_builder, '_reachable', {})

        def refuse(*a, **k):
            raise OSError('network unreachable (test)')
        monkeypatch.setattr(socket, 'create_connection', refuse)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError) as e:
        timm.create_model(rel.model, pretrained=True)
    assert time.perf_counter() - t0 < 5.0
    msg = str(e.value)
    _assert_routes(msg, rel)
    assert ('HF_HUB_OFFLINE is set' if how == 'HF_HUB_OFFLINE' else 'cannot be reached') in msg


def test_routes_in_the_message_work(monkeypatch, tmp_path):
    """The first and last routes the message gives load the shipped weights (from the repository root)."""
    rel = RELEASES[0]
    monkeypatch.chdir(REPO)
    ref = _load_folder(HUB / rel.name)
    for model in (timm.create_model(f'local-dir:hub/{rel.name}', pretrained=True),
                  timm.create_model(rel.name, pretrained=True,
                                    pretrained_cfg_overlay=dict(file=f'hub/{rel.name}/model.safetensors'))):
        assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_model_without_release_is_a_clear_error_not_random_weights():
    unreleased = [m for m in OUR_MODELS if find_release(m, None) is None]
    if not unreleased:
        pytest.skip('every model has a release')
    with pytest.raises(RuntimeError, match=r'(?s)has no pretrained weights.*pretrained_cfg_overlay=dict\(file='):
        timm.create_model(unreleased[0], pretrained=True)


# ----------------------------------------------------------------------------------------------------------------
# no workspace in the product
# ----------------------------------------------------------------------------------------------------------------

WORKSPACE_MARKERS = ('../shared', 'shared/data', 'shared/timm-scripts', 'spec.md', '/work/', '/tmp/pytest')


def test_product_names_no_workspace_path():
    """The package, hub/ (cards, configs, safetensors headers), README.md and MODEL_CARD.md name no machine paths
    and no notes outside the repository."""
    files = [REPO / 'README.md', REPO / 'MODEL_CARD.md']
    for top in ('timm_spot', 'hub'):
        files += [p for p in (REPO / top).rglob('*') if p.is_file() and '__pycache__' not in p.parts]
    found = []
    for p in files:
        if p.suffix == '.safetensors':
            with open(p, 'rb') as f:
                text = f.read(int.from_bytes(f.read(8), 'little')).decode('utf-8', 'replace')
        elif p.suffix in ('.py', '.md', '.json', '.yaml', '.yml', '.txt', ''):
            text = p.read_text(encoding='utf-8', errors='replace')
        else:
            continue
        found += [f'{p.relative_to(REPO)}: {m}' for m in WORKSPACE_MARKERS if m in text]
    assert not found, found

"""The released backbone in hub/alexnet_spot loads through timm's real Hub code path, offline, and is what the
model card says it is."""
import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import timm_spot  # noqa: F401
from hub.cache import build_offline_cache
from hub.card import split_front_matter
from test_hub_offline import use_cache

RELEASE = Path(__file__).resolve().parents[1] / 'hub' / 'alexnet_spot'
REPO_ID = 'timm-spot/alexnet_spot.spot_c10_64'

pytestmark = pytest.mark.skipif(
    not (RELEASE / 'model.safetensors').is_file(), reason=f'no released weights at {RELEASE}')


def test_released_backbone_loads_by_tag_and_hf_hub_name_offline(monkeypatch, tmp_path):
    cache = build_offline_cache(RELEASE, REPO_ID, tmp_path / 'hf' / 'hub')
    use_cache(monkeypatch, cache)
    exported = safetensors.torch.load_file(str(RELEASE / 'model.safetensors'))
    for name in ('alexnet_spot.spot_c10_64', f'hf-hub:{REPO_ID}'):
        model = timm.create_model(name, pretrained=True).eval()
        for k, v in model.state_dict().items():
            assert torch.equal(v, exported[k]), (name, k)
        assert model.pretrained_cfg['input_size'] == (3, 64, 64)
        with torch.no_grad():
            feats = model(torch.randn(2, 3, 64, 64))
        assert feats.shape == (2, 256) and torch.isfinite(feats).all()


def test_released_card_and_metadata_describe_the_training_run():
    config = json.loads((RELEASE / 'config.json').read_text())
    assert config['architecture'] == 'alexnet_spot' and config['num_classes'] == 0
    meta, _ = split_front_matter((RELEASE / 'README.md').read_text())
    assert meta['library_name'] == 'timm' and meta['model-index'][0]['name'] == 'alexnet_spot.spot_c10_64'
    with open(RELEASE / 'model.safetensors', 'rb') as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), 'little')))['__metadata__']
    assert header['pretrained_tag'] == 'spot_c10_64' and 'cifar10' in header['training_data']

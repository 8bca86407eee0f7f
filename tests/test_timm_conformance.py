"""timm's own model test-suite (``tests/test_models.py`` of the installed timm) run on our models.

timm parametrises those tests over ``list_models()`` at import time and filters some of them by *timm's*
module names (forward_intermediates, prune contract), which would silently leave plugin models out; so this
file imports timm's test module (after ``import timm_spot``) and calls each per-model test function for each
of our registered models. The few combinations that cannot hold by design are expected failures with the
reason written next to them (strict: if one starts passing, the suite says so).

``.ci/run`` fetches the test file from the package index (``python tests/timm_conformance.py``) and sets
``TIMM_SPOT_REQUIRE_CONFORMANCE=1`` so that a missing file fails CI instead of skipping. It also runs timm's
test_models.py itself on our models (``pytest -p timm_spot ... -k``) against a cache seeded by
``python -m hub cache --all``, with ``HF_HUB_OFFLINE=1``.

The pretrained tests (``test_model_load_pretrained``, ``test_model_features_pretrained``) run here on every tag
``timm.list_pretrained`` gives for our models, offline, from a Hugging Face cache seeded by exactly
``python -m hub cache --all --cache-dir DIR`` (every release folder in hub/).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_conformance import load_timm_test_models, timm_tests_dir

import timm_spot  # noqa: F401

# timm's whole model suite on three models, and a Hub cache seeded in a subprocess: the slow lane
pytestmark = pytest.mark.slow

OUR_MODELS = ('alexnet_spot', 'alexnet_spot_discriminator', 'damage_repair_generator')

# timm test function -> batch size it is parametrised with in timm
PER_MODEL_TESTS = {
    'test_model_forward': 1,
    'test_model_backward': 2,
    'test_model_default_cfgs': 1,
    'test_model_forward_torchscript': 1,
    'test_model_forward_features': 1,
    'test_model_forward_intermediates': 1,
    'test_model_forward_intermediates_features': 1,
    'test_model_forward_fx': 1,
    'test_model_backward_fx': 2,
    'test_model_forward_fx_torchscript': 1,
    'test_prune_intermediate_layers_contract': None,
}
# timm pretrained tests, run on every pretrained tag of our models (from the seeded offline cache)
PRETRAINED_TESTS = {'test_model_load_pretrained': 1, 'test_model_features_pretrained': 1}
# Not run here, with the reason:
#  test_model_inference: only for timm's 'test_*' models with reference tensors on the Hub.

_MASK_HEAD_REASON = (
    "forward() returns the real/corrupt logit only; the mask head is the discriminator's second pretext "
    'output (forward_pretext), so "every parameter gets a gradient from forward()" cannot hold. '
    'tests/test_alexnet_spot.py::test_both_pretext_heads_get_gradients checks both heads instead.'
)
EXPECTED_FAILURES = {
    ('test_model_backward', 'alexnet_spot_discriminator'): _MASK_HEAD_REASON,
    ('test_model_backward_fx', 'alexnet_spot_discriminator'): _MASK_HEAD_REASON,
}

_timm_tests = load_timm_test_models()
if _timm_tests is None:
    _missing = f'timm test-suite not found at {timm_tests_dir()}; fetch it with `python tests/timm_conformance.py`'
    if os.environ.get('TIMM_SPOT_REQUIRE_CONFORMANCE') == '1':
        raise RuntimeError(_missing)
    pytest.skip(_missing, allow_module_level=True)


# timm runs its cfg test on every pretrained tag (list_models(include_tags=True)); so do we
TAGGED_TESTS = ('test_model_default_cfgs',)


def _params():
    import timm
    tagged = timm.list_models(list(OUR_MODELS), include_tags=True)
    for test_name in PRETRAINED_TESTS:
        for model_name in timm.list_models(list(OUR_MODELS), pretrained=True):
            yield pytest.param(test_name, model_name, id=f'{test_name}[{model_name}]')
    for test_name in PER_MODEL_TESTS:
        for model_name in (tagged if test_name in TAGGED_TESTS else OUR_MODELS):
            marks = []
            reason = EXPECTED_FAILURES.get((test_name, model_name.split('.')[0]))
            if reason:
                marks.append(pytest.mark.xfail(reason=reason, strict=True, raises=AssertionError))
            yield pytest.param(test_name, model_name, marks=marks, id=f'{test_name}[{model_name}]')


@pytest.fixture(scope='module')
def _seeded_cache_dir(tmp_path_factory):
    cache = tmp_path_factory.mktemp('hf') / 'hub'
    subprocess.run([sys.executable, '-m', 'hub', 'cache', '--all', '--cache-dir', str(cache)],
                   cwd=Path(__file__).resolve().parents[1], check=True, capture_output=True, text=True)
    return cache


@pytest.fixture
def seeded_offline_cache(monkeypatch, _seeded_cache_dir):
    from test_hub_offline import use_cache
    return use_cache(monkeypatch, _seeded_cache_dir)


@pytest.mark.parametrize('test_name,model_name', list(_params()))
def test_timm_model_suite(test_name, model_name, request):
    fn = getattr(_timm_tests, test_name, None)
    if fn is None:
        pytest.skip(f'{test_name} is not in timm {_timm_tests.timm.__version__} tests (renamed or removed)')
    if test_name in PRETRAINED_TESTS:
        request.getfixturevalue('seeded_offline_cache')
    torch.manual_seed(0)
    batch_size = {**PER_MODEL_TESTS, **PRETRAINED_TESTS}[test_name]
    kwargs = {}
    if 'cfg_device' in fn.__code__.co_varnames[:fn.__code__.co_argcount]:
        kwargs['cfg_device'] = 'meta' if getattr(_timm_tests, '_HAS_DEVICE_CONTEXT', False) else 'cpu'
    if batch_size is None:
        fn(model_name, **kwargs)
    else:
        fn(model_name, batch_size, **kwargs)


def test_timm_own_parametrisation_selects_our_models():
    """timm's list_models() filters (run at import) include every one of our models in its generic tests."""
    for test_name in ('test_model_forward', 'test_model_backward', 'test_model_default_cfgs',
                      'test_model_forward_torchscript', 'test_model_forward_features', 'test_model_forward_fx'):
        marks = getattr(getattr(_timm_tests, test_name), 'pytestmark', [])
        names = set()
        for mark in marks:
            if mark.name == 'parametrize' and mark.args[0] == 'model_name':
                names.update(n.split('.')[0] for n in mark.args[1])  # some lists carry pretrained tags
        assert set(OUR_MODELS) <= names, f'{test_name} would not select {set(OUR_MODELS) - names}'

"""``timm-spot`` defaults: threads picked like the trainer's (one per idle core); the probes' feature cache: bounded (least recently used files deleted beyond TIMM_SPOT_FEATURE_CACHE_GB), and
switchable off (TIMM_SPOT_FEATURE_CACHE=0, ``--no-feature-cache``), placed under the usual cache variables."""
import os

import torch

from timm_spot import cli
from timm_spot.eval import features as F
from timm_spot.eval.protocols import default_cache_dir


def _fs(n=1000):  # a 20-kB cache file
    return F.FeatureSet(['conv1'], [torch.zeros(n, 1)], torch.zeros(n, dtype=torch.long),
                        torch.arange(n), [(1, 1)], {})


def _calls():
    calls = []

    def compute():
        calls.append(1)
        return _fs()
    return calls, compute


def test_cache_is_bounded_oldest_files_go_first(tmp_path, monkeypatch):
    monkeypatch.setenv('TIMM_SPOT_FEATURE_CACHE_GB', str(50_000 / 1e9))  # room for two 20-kB files
    calls, compute = _calls()
    for i in range(4):
        F.load_or_extract(str(tmp_path), {'k': i}, compute)
        path = tmp_path / f'features-{F.feature_cache_key(k=i)}.safetensors'
        os.utime(path, (1000 + i, 1000 + i))  # deterministic ages
    files = sorted(p.name for p in tmp_path.iterdir())
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert total <= 50_000 and len(files) == 2
    assert files == sorted(f'features-{F.feature_cache_key(k=i)}.safetensors' for i in (2, 3))  # the newest stay
    assert len(calls) == 4
    F.load_or_extract(str(tmp_path), {'k': 3}, compute)  # a hit: not recomputed
    assert len(calls) == 4


def test_prune_keeps_the_file_just_written_even_over_the_bound(tmp_path):
    F.load_or_extract(str(tmp_path), {'k': 0}, _calls()[1])
    path = next(tmp_path.iterdir())
    assert F.prune_feature_cache(str(tmp_path), limit_bytes=0, keep=[str(path)]) == []
    assert F.prune_feature_cache(str(tmp_path), limit_bytes=0) == [str(path)]


def test_cache_switched_off_by_env(tmp_path, monkeypatch):
    monkeypatch.setenv('TIMM_SPOT_FEATURE_CACHE', '0')
    calls, compute = _calls()
    F.load_or_extract(str(tmp_path), {'k': 0}, compute)
    F.load_or_extract(str(tmp_path), {'k': 0}, compute)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_cache_location_and_cli_switch(tmp_path, monkeypatch):
    monkeypatch.delenv('TIMM_SPOT_CACHE', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert default_cache_dir() == str(tmp_path / 'xdg' / 'timm_spot' / 'features')
    monkeypatch.setenv('TIMM_SPOT_CACHE', str(tmp_path / 'mine'))
    assert default_cache_dir() == str(tmp_path / 'mine' / 'features')
    args = cli.build_parser().parse_args(['probe', '--data', 'x', '--no-feature-cache'])
    assert cli._cache_dir(args) is None
    args = cli.build_parser().parse_args(['probe', '--data', 'x'])
    assert cli._cache_dir(args) == str(tmp_path / 'mine' / 'features')
    monkeypatch.setenv('TIMM_SPOT_FEATURE_CACHE_GB', 'lots')
    try:
        F.feature_cache_limit_bytes()
    except ValueError as e:
        assert 'TIMM_SPOT_FEATURE_CACHE_GB' in str(e)
    else:
        raise AssertionError('a malformed bound must be an error')


def test_cli_threads_default_is_the_trainers_idle_core_count(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr('os.sched_getaffinity', lambda pid: {0, 1})
    try:
        monkeypatch.setattr('os.getloadavg', lambda: (1.2, 0, 0))  # one of two cores busy
        assert cli.main(['figure', 'filters', '--out', str(tmp_path / 'f.png')]) == 0
        assert torch.get_num_threads() == 1
        monkeypatch.setattr('os.getloadavg', lambda: (0.0, 0, 0))
        assert cli.main(['figure', 'filters', '--out', str(tmp_path / 'f.png')]) == 0
        assert torch.get_num_threads() == 2
        assert cli.main(['--threads', '1', 'figure', 'filters', '--out', str(tmp_path / 'f.png')]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_cli_hub_forwards_to_the_checkouts_hub_tooling(capsys, tmp_path, monkeypatch):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(tmp_path)  # found from the installed package's location, not only from the working dir
    assert cli._find_hub_checkout() == repo
    folder = os.path.join(repo, 'hub', 'alexnet_spot.spot_c10_64_v2')
    assert cli.main(['hub', 'publish', folder, '--repo-id', 'timm-spot/alexnet_spot.spot_c10_64_v2',
                     '--dry-run']) == 0
    assert 'model.safetensors' in capsys.readouterr().out


def test_cli_hub_without_a_checkout_says_so(monkeypatch, capsys):
    monkeypatch.setattr(cli, '_find_hub_checkout', lambda: None)  # as in a wheel install
    assert cli.main(['hub', 'export', 'runs/demo']) == 2
    err = capsys.readouterr().err
    assert 'needs a timm-spot checkout' in err and 'hf-hub:' in err and 'local-dir:' in err

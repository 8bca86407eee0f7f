"""Issue 22 (hostile input round 3): no path out of a folder, no glob in an upload, one process per run dir, every
config checked before work starts, an integrity record for the final weights, and one clear line per mistake."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import timm
import timm_spot  # noqa: F401
from test_faults import _hub_folder, finished_run, master_run, snapshot, tiny_config  # noqa: F401  (fixtures)
from train_scripts.pretrain import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class CommitApi:
    """HfApi stand-in that records the commit operations (no network)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        return type('R', (), {'repo_id': repo_id})()

    def create_branch(self, repo_id, **kw):
        self.calls.append(('create_branch', kw))

    def create_commit(self, **kw):
        self.calls.append(('create_commit', kw))
        return type('C', (), {'oid': 'b' * 40, 'commit_url': 'u', 'pr_url': None})()

    def upload_folder(self, **kw):
        raise AssertionError('upload_folder turns file names into glob patterns: never used')


# ------------------------------------------------------------------------------------------------ 1. publish
def test_publish_commits_exactly_the_listed_files_even_with_glob_names(tmp_path, capsys):
    from hub.publish import publish_folder

    folder = _hub_folder(tmp_path)
    (folder / '.env').write_text('HF_TOKEN=secret')
    (folder / '*').write_text('a file named star')
    (folder / '[.]env').write_text('a file named [.]env')
    api = CommitApi()
    summary = publish_folder(folder, 'someone/alexnet_spot.test', api=api)
    (kind, kw), = api.calls
    ops = kw['operations']
    sent = {op.path_in_repo: op.path_or_fileobj for op in ops}
    assert sorted(sent) == sorted(f['path'] for f in summary['files'])
    assert '*' in sent and '[.]env' in sent and '.env' not in sent
    assert sent['[.]env'] == str(folder / '[.]env')  # itself, not .env
    assert all(Path(p).read_bytes() != b'HF_TOKEN=secret' for p in sent.values())
    # the dry run lists the same files
    capsys.readouterr()
    dry = publish_folder(folder, 'someone/alexnet_spot.test', dry_run=True)
    assert sorted(f['path'] for f in dry['files']) == sorted(sent)
    out = capsys.readouterr().out
    assert '[.]env' in out and '.env ' not in out.replace('[.]env', '')


def test_publish_refuses_a_symlink_out_of_the_folder(tmp_path):
    from hub.publish import publish_folder

    folder = _hub_folder(tmp_path)
    secret = tmp_path / 'secret.txt'
    secret.write_text('HF_TOKEN=secret')
    (folder / 'notes.txt').symlink_to(secret)
    api = CommitApi()
    for dry_run in (True, False):
        with pytest.raises(ValueError, match=r'notes\.txt is a symlink'):
            publish_folder(folder, 'someone/alexnet_spot.test', api=api, dry_run=dry_run, log=None)
    assert api.calls == []


# ------------------------------------------------------------------------------------------------ 2. export tags
def _fake_run(tmp_path) -> Path:
    """The run _hub_folder exports (alexnet_spot only), without exporting it."""
    _hub_folder(tmp_path)
    return tmp_path / 'fake-run'


@pytest.mark.parametrize('tag', ['../../../x', 'a/b', '..', '.hidden', '-x', 'x' * 120, 'a..b', 'sp ace'])
def test_export_refuses_a_tag_that_is_not_a_repo_name(tmp_path, capsys, tag):
    from hub.__main__ import cli

    run = _fake_run(tmp_path)
    out = tmp_path / 'out'
    out.mkdir()
    victim = tmp_path / 'x'
    victim.mkdir()
    (victim / 'keep.txt').write_text('mine')
    before = sorted(p for p in tmp_path.rglob('*'))
    assert cli(['export', str(run), '--out', str(out), f'--tag={tag}', '--force', '--no-verify']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and '--tag' in err and repr(tag) in err
    assert sorted(p for p in tmp_path.rglob('*')) == before and (victim / 'keep.txt').read_text() == 'mine'


def test_export_refuses_a_folder_that_links_out_of_out(tmp_path, capsys):
    from hub.__main__ import cli

    run = _fake_run(tmp_path)
    out = tmp_path / 'out'
    out.mkdir()
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    (elsewhere / 'keep.txt').write_text('mine')
    (out / 'alexnet_spot.t1').symlink_to(elsewhere)
    assert cli(['export', str(run), '--out', str(out), '--tag', 't1', '--force', '--no-verify']) == 2
    assert 'outside --out' in capsys.readouterr().err
    assert (elsewhere / 'keep.txt').read_text() == 'mine'


def _sha_tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob('*')) if p.is_file()}


@pytest.mark.slow
def test_export_without_tag_never_touches_a_shipped_release(tmp_path, monkeypatch, capsys):
    """Issue 19: `python -m hub export RUN` wrote over hub/<model>.<default tag>/; now it writes a new folder named
    after the run and the date, and an explicit release tag needs --force. Every file under hub/ keeps its sha256."""
    import hub.__main__ as hub_cli

    run = _fake_run(tmp_path)
    hub_copy = tmp_path / 'hub'
    for folder in hub_cli.HUB_DIR.iterdir():
        if (folder / 'config.json').is_file():
            shutil.copytree(folder, hub_copy / folder.name)
    monkeypatch.setattr(hub_cli, 'HUB_DIR', hub_copy)  # the default --out
    before = _sha_tree(hub_copy)
    assert hub_cli.cli(['export', str(run), '--no-verify']) == 0
    assert 'no --tag given' in capsys.readouterr().out
    after = _sha_tree(hub_copy)
    assert {k: after[k] for k in before} == before
    new = sorted({k.split('/')[0] for k in after} - {k.split('/')[0] for k in before})
    assert new == [f'alexnet_spot.fake-run_{time.strftime("%Y%m%d")}']
    # naming a shipped release explicitly: refused without --force
    assert hub_cli.cli(['export', str(run), '--tag', 'spot_c10_64_v2', '--no-verify']) == 2
    assert '--force' in capsys.readouterr().err
    assert {k: _sha_tree(hub_copy)[k] for k in before} == before


def test_exported_files_are_world_readable(tmp_path):
    folder = _hub_folder(tmp_path)
    umask = os.umask(0o022)
    os.umask(umask)
    for p in folder.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p.name


# ------------------------------------------------------------------------------------------------ 3. run dir lock
def _hold_lock(out: Path):
    """A second process holding the run dir's lock (as a running pretraining process does)."""
    code = ('import sys, time; from train_scripts.checkpoint import RunLock; lock = RunLock(sys.argv[1]); '
            'print("locked", flush=True); time.sleep(120)')
    proc = subprocess.Popen([sys.executable, '-c', code, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.stdout.readline().strip() == 'locked'
    return proc


@pytest.mark.slow
@pytest.mark.parametrize('extra', [[], ['--overwrite'], ['--resume']])
def test_a_run_dir_in_use_is_refused_naming_the_holder(finished_run, capsys, extra):
    cfg, out = finished_run
    before = snapshot(out)
    holder = _hold_lock(out)
    try:
        args = ['--output-dir', str(out)] + (['--config', cfg] if extra != ['--resume'] else []) + extra
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f'pid {holder.pid}' in err and 'in use' in err
        assert {k: v for k, v in snapshot(out).items() if k != '.lock'} == before
    finally:
        holder.kill()
        holder.wait()
    assert main(['--output-dir', str(out), '--resume']) == 0  # the lock dies with its holder
    assert not (out / '.lock').exists()


@pytest.mark.slow
def test_a_new_run_dir_in_use_is_refused(tmp_path, capsys):
    out = tmp_path / 'new'
    holder = _hold_lock(out)
    try:
        assert main(['--config', tiny_config(tmp_path), '--output-dir', str(out)]) == 2
        assert f'pid {holder.pid}' in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == ['.lock']
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------------------ 4. model kwargs
@pytest.mark.parametrize('key,kwargs,bad', [
    ('discriminator_kwargs', {'head_hidden_size': 64, 'head_hiden_size': 32}, 'head_hiden_size'),
    ('generator_kwargs', {'widht': 3}, 'widht'),
])
def test_unknown_model_kwarg_is_refused_before_anything_is_written(tmp_path, capsys, key, kwargs, bad):
    out = tmp_path / 'run'
    cfg = tiny_config(tmp_path, **{key: kwargs})
    assert main(['--config', cfg, '--output-dir', str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and repr(bad) in err and 'valid keys' in err
    assert ('head_hidden_size' if key == 'discriminator_kwargs' else 'stem_width') in err
    assert not out.exists()


def test_model_kwarg_with_a_bad_value_is_refused_up_front(tmp_path, capsys):
    out = tmp_path / 'run'
    cfg = tiny_config(tmp_path, generator_kwargs={'fill': 'zeros'})
    assert main(['--config', cfg, '--output-dir', str(out)]) == 2
    err = capsys.readouterr().err
    assert 'generator_kwargs' in err and 'fill' in err and 'Traceback' not in err and not out.exists()


# ------------------------------------------------------------------------------------------------ 7. weight hashes
@pytest.mark.slow
def test_run_records_weight_hashes_and_export_refuses_a_changed_file(finished_run, tmp_path, capsys):
    from hub.__main__ import cli

    _, out = finished_run
    record = json.loads((out / 'weights_sha256.json').read_text())
    for name in ('alexnet_spot', 'alexnet_spot_discriminator', 'damage_repair_generator',
                 'damage_repair_generator_stage1'):
        data = (out / f'{name}.safetensors').read_bytes()
        assert record[f'{name}.safetensors'] == hashlib.sha256(data).hexdigest()
    hub = tmp_path / 'hub'
    assert cli(['export', str(out), '--out', str(hub), '--models', 'alexnet_spot', '--tag', 't', '--no-verify']) == 0
    path = out / 'alexnet_spot.safetensors'
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one flipped bit in a weight
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli(['export', str(out), '--out', str(hub), '--models', 'alexnet_spot', '--tag', 't2',
                '--no-verify']) == 2
    err = capsys.readouterr().err
    assert 'alexnet_spot.safetensors' in err and 'sha256' in err and 'corrupt' in err
    assert not (hub / 'alexnet_spot.t2').exists()


def test_release_table_hashes_are_those_of_the_shipped_files():
    from timm_spot.models._releases import RELEASES

    for rel in RELEASES:
        data = (REPO / 'hub' / rel.name / 'model.safetensors').read_bytes()
        assert rel.sha256 == hashlib.sha256(data).hexdigest(), rel.name


def test_loading_a_release_whose_cached_file_changed_is_refused(tmp_path, monkeypatch):
    from hub.cache import build_offline_cache
    from test_hub_offline import use_cache

    name = 'alexnet_spot.spot_c10_64'
    cache = tmp_path / 'hf' / 'hub'
    build_offline_cache(REPO / 'hub' / name, f'timm-spot/{name}', cache, link='copy')
    use_cache(monkeypatch, cache)
    timm.create_model(name, pretrained=True)  # intact: loads
    (cached,) = [p for p in cache.rglob('model.safetensors') if not p.is_symlink()]
    data = bytearray(cached.read_bytes())
    data[-100] ^= 0x01
    cached.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match='does not match the sha256 of the release'):
        timm.create_model(name, pretrained=True)


# ------------------------------------------------------------------------------------------------ 5. resume changes
@pytest.mark.slow
def test_resume_with_a_changed_lr_says_so_and_records_it(tmp_path, capsys):
    from hub.__main__ import cli

    out = tmp_path / 'run'
    cfg = tiny_config(tmp_path, stage2_steps=2)
    assert main(['--config', cfg, '--output-dir', str(out), '--max-steps', '1']) == 0
    capsys.readouterr()
    assert main(['--output-dir', str(out), '--resume', '--set', 'lr=0.001', '--stage2-steps', '3']) == 0
    text = capsys.readouterr().out
    assert "lr changes from 0.0003 to 0.001 at stage 2 step 1" in text
    assert 'stage2_steps changes from 2 to 3 at stage 2 step 1' in text
    history = [json.loads(line) for line in (out / 'config_history.jsonl').read_text().splitlines()]
    assert {'stage': 2, 'step': 1, 'key': 'lr', 'old': 0.0003, 'new': 0.001} in history
    assert {'stage': 2, 'step': 1, 'key': 'stage2_steps', 'old': 2, 'new': 3} in history
    saved = (out / 'config.yaml').read_text()
    assert "lr: 0.0003 until stage 2 step 1, then 0.001" in saved  # not as if 0.001 held for the whole run
    assert yaml.safe_load(saved)['lr'] == 0.001
    # a plain resume afterwards changes nothing more
    assert main(['--output-dir', str(out), '--resume']) == 0
    assert len((out / 'config_history.jsonl').read_text().splitlines()) == 2
    hub = tmp_path / 'hub'
    assert cli(['export', str(out), '--out', str(hub), '--models', 'alexnet_spot', '--tag', 't', '--no-verify']) == 0
    shipped = (hub / 'alexnet_spot.t' / 'training_config.yaml').read_text()
    assert "lr: 0.0003 until stage 2 step 1, then 0.001" in shipped
    assert 'changed on --resume' in (hub / 'alexnet_spot.t' / 'README.md').read_text()


# ------------------------------------------------------------------------------------------------ 6. probe labels
def test_probe_refuses_a_stray_huge_label(tmp_path, capsys):
    import datasets

    from test_faults import _png
    from timm_spot.cli import main as cli
    from timm_spot.eval.labelled import load_labelled

    path = tmp_path / 'stray.parquet'
    labels = [0, 1, 2, 3] * 3 + [1_000_000]
    datasets.Dataset.from_dict({'image': [_png()] * len(labels), 'label': labels}).to_parquet(str(path))
    with pytest.raises(ValueError, match=r'label 1000000 \(row 12\) far outside the 5 distinct labels'):
        load_labelled(str(path))
    assert cli(['probe', '--data', str(path), '--no-cache', '--epochs', '1']) == 2
    assert 'label 1000000' in capsys.readouterr().err
    # a subset of a many-class dataset with gaps still loads
    datasets.Dataset.from_dict({'image': [_png()] * 3, 'label': [0, 50, 99]}).to_parquet(str(path))
    assert load_labelled(str(path)).num_classes == 100


# ------------------------------------------------------------------------------------------------ 8, 9. one line each
def _one_line(err: str) -> str:
    import re
    lines = [l for l in err.strip().splitlines() if l.strip() and not re.search(r'\[\d\d:\d\d', l)]  # no tqdm
    assert len(lines) == 1 and 'Traceback' not in err, err
    return lines[0]


def _empty_parquet(path: Path) -> str:
    import datasets

    feats = datasets.Features({'image': datasets.Image(decode=False), 'label': datasets.Value('int64')})
    datasets.Dataset.from_dict({'image': [], 'label': []}, features=feats).to_parquet(str(path))
    return str(path)


def test_empty_parquet_is_named_in_pretraining_and_probe(tmp_path, capsys):
    from timm_spot.cli import main as cli

    data = _empty_parquet(tmp_path / 'empty.parquet')
    assert main(['--config', tiny_config(tmp_path), '--output-dir', str(tmp_path / 'o'), '--data', data]) == 2
    line = _one_line(capsys.readouterr().err)
    assert 'empty.parquet' in line and 'no rows' in line
    assert cli(['probe', '--data', data, '--no-cache']) == 2
    line = _one_line(capsys.readouterr().err)
    assert 'empty.parquet' in line and 'no rows' in line
    assert not (tmp_path / 'o').exists()


@pytest.mark.slow
def test_hub_dataset_id_offline_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_DATASETS_OFFLINE='1', PYTHONPATH=str(REPO),
               HF_HOME=str(tmp_path / 'hf'))
    proc = subprocess.run([sys.executable, 'train_scripts/pretrain.py', '--config', tiny_config(tmp_path),
                           '--output-dir', str(tmp_path / 'o'), '--data', 'someone/no-such-dataset'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = _one_line(proc.stderr)
    assert 'someone/no-such-dataset' in line and 'must be downloaded' in line and 'Hub cannot be reached' in line


def test_output_dir_that_is_a_file_or_read_only(tmp_path, monkeypatch, capsys):
    target = tmp_path / 'afile'
    target.write_text('mine')
    assert main(['--config', tiny_config(tmp_path), '--output-dir', str(target)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert 'is a file' in line and '--output-dir' in line and target.read_text() == 'mine'

    import errno
    real = os.makedirs
    out = tmp_path / 'ro' / 'run'

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path / 'ro')):
            raise PermissionError(errno.EACCES, 'Permission denied', str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(os, 'makedirs', read_only)
    assert main(['--config', tiny_config(tmp_path), '--output-dir', str(out)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert 'cannot write to --output-dir' in line and 'writable' in line


@pytest.mark.parametrize('argv', [['--img-size', '8192'], ['--set', 'img_size=8192']])
def test_huge_img_size_is_refused_before_allocation(tmp_path, capsys, argv):
    assert main(['--config', tiny_config(tmp_path), '--output-dir', str(tmp_path / 'o')] + argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert 'img_size' in line and '1024' in line and '8192' in line


@pytest.mark.parametrize('command', ['probe', 'spot'])
@pytest.mark.parametrize('size', ['0', '-16', '8192'])
def test_cli_img_size_out_of_range_is_one_line(tmp_path, capsys, command, size):
    from timm_spot.cli import main as cli

    args = ['probe', '--data', 'builtin'] if command == 'probe' else ['spot', str(tmp_path / 'x.png')]
    assert cli(args + [f'--img-size={size}']) == 2
    line = _one_line(capsys.readouterr().err)
    assert '--img-size' in line and size in line


@pytest.mark.slow
def test_ctrl_c_says_where_the_checkpoint_is_and_how_to_resume(tmp_path, monkeypatch, capsys):
    from train_scripts import trainer

    real = trainer.Pretrainer.run_stage

    def interrupted(self, number, resume_path):
        if number == 2:
            raise KeyboardInterrupt
        return real(self, number, resume_path)
    monkeypatch.setattr(trainer.Pretrainer, 'run_stage', interrupted)
    out = tmp_path / 'run'
    cfg = tiny_config(tmp_path)
    assert main(['--config', cfg, '--output-dir', str(out), '--seed', '3']) == 130
    line = _one_line(capsys.readouterr().err)
    expected = f'python train_scripts/pretrain.py --config {cfg} --output-dir {out} --seed 3 --resume'
    assert 'stage1_step0000001' in line and line.endswith(expected)
    monkeypatch.setattr(trainer.Pretrainer, 'run_stage', real)
    assert main(expected.split()[2:]) == 0  # the printed command works
    assert not (out / '.lock').exists()


@pytest.mark.slow
def test_resume_advice_names_only_what_the_user_gave(finished_run, tmp_path, capsys):
    _, out = finished_run
    other = tmp_path / 'other.yaml'
    other.write_text('img_size: 64\n')
    assert main(['--config', str(other), '--output-dir', str(out), '--resume']) == 2
    line = _one_line(capsys.readouterr().err)
    assert f'drop img_size in {other}' in line and 'the option' not in line
    assert main(['--output-dir', str(out), '--resume', '--img-size', '64']) == 2
    assert 'drop --img-size 64' in capsys.readouterr().err


@pytest.mark.slow
def test_failed_overwrite_says_where_the_earlier_run_is(finished_run, monkeypatch, capsys):
    from train_scripts import trainer

    cfg, out = finished_run

    def boom(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer.Pretrainer, 'run_stage', boom)
    assert main(['--config', cfg, '--output-dir', str(out), '--overwrite']) == 130
    err = capsys.readouterr().err
    (aside,) = [p for p in out.iterdir() if p.name.startswith('.replaced-')]
    assert f'kept in {aside}' in err and 'interrupted' in err


def test_export_input_problems_are_one_line(tmp_path, monkeypatch, capsys):
    import errno

    import safetensors.torch

    from hub.__main__ import cli

    run = _fake_run(tmp_path)
    hub = tmp_path / 'out'
    args = ['export', str(run), '--out', str(hub), '--tag', 't', '--no-verify']
    assert cli(args) == 0
    before = snapshot(hub / 'alexnet_spot.t')
    capsys.readouterr()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(safetensors.torch, 'save_file', full)
    assert cli(args) == 4
    assert 'no space left' in _one_line(capsys.readouterr().err)
    monkeypatch.undo()
    assert snapshot(hub / 'alexnet_spot.t') == before and sorted(p.name for p in hub.iterdir()) == ['alexnet_spot.t']

    good = (run / 'config.yaml').read_text()
    (run / 'config.yaml').write_text('img_size: [64\n')
    assert cli(args) == 2
    line = _one_line(capsys.readouterr().err)
    assert 'config.yaml' in line and 'not valid YAML' in line and 'line' in line
    (run / 'config.yaml').write_text(good)
    (run / 'model_args.json').write_text('{garbage')
    assert cli(args) == 2
    assert 'model_args.json' in _one_line(capsys.readouterr().err)


def test_local_dir_with_another_architecture_in_config_names_both(tmp_path):
    folder = tmp_path / 'ld'
    shutil.copytree(REPO / 'hub' / 'alexnet_spot.spot_c10_64', folder)
    config = json.loads((folder / 'config.json').read_text())
    config['architecture'] = 'damage_repair_generator'
    (folder / 'config.json').write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="config.json names architecture 'damage_repair_generator' but "
                                           "model.safetensors holds 'alexnet_spot' weights"):
        timm.create_model(f'local-dir:{folder}', pretrained=True)

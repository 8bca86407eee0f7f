"""Issue 12: the pretraining, evaluation and Hub tools under bad input and faults.

One test (or a few) per item of the issue, each reproducing the reported problem: nothing an earlier run wrote is
lost before the new run's inputs are checked, no user file is unpickled, a failed --resume changes nothing,
checkpoints carry checksums and fall back to the newest intact one, user mistakes end with one line and exit
code 2, NaN weights are an error, images are decoded upright and bounded in size.
"""
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import timm
import timm_spot  # noqa: F401
from train_scripts import config as C
from train_scripts.pretrain import config_from_args, main

TINY = dict(
    data='builtin', img_size=32, batch_size=4, gen_stem_width=8, gen_widths=[8, 16, 32, 64],
    discriminator_kwargs={'head_hidden_size': 64}, stage1_steps=1, stage2_steps=1, history_batches=2,
    num_workers=0, threads=1, log_every=1, figure_every=0, checkpoint_every=1, num_figure_images=2,
    progress=False,
)
WEIGHTS = ('alexnet_spot.safetensors', 'alexnet_spot_discriminator.safetensors',
           'damage_repair_generator.safetensors', 'damage_repair_generator_stage1.safetensors')


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_config(tmp_path, name='tiny.yaml', **overrides):
    cfg = dict(TINY)
    cfg.update(overrides)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def snapshot(out: Path) -> dict:
    """relative path -> bytes of every file of a run dir (what must survive a failed command)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob('*')) if p.is_file()}


def _png(color=(0, 200, 0), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new('RGB', size, color).save(buf, format='PNG')
    return buf.getvalue()


def _parquet(path: Path, cells) -> str:
    import datasets

    feats = datasets.Features({'image': datasets.Image(decode=False)})
    datasets.Dataset.from_dict({'image': cells}, features=feats).to_parquet(str(path))
    return str(path)


@pytest.fixture(scope='module')
def master_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('master')
    out = root / 'run'
    threads = torch.get_num_threads()
    try:
        assert main(['--config', tiny_config(root), '--output-dir', str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture
def finished_run(tmp_path, master_run):
    """A complete tiny run (1 + 1 steps, checkpoints after each), a fresh copy per test: (config path, output dir)."""
    out = tmp_path / 'run'
    shutil.copytree(master_run, out)
    return tiny_config(tmp_path), out


# ------------------------------------------------------------------------------------------------ 1. data loss
@pytest.mark.slow
def test_rerun_with_a_typo_in_data_keeps_the_earlier_run(finished_run, tmp_path, capsys):
    """Issue repro: a run into runs/x, then the same with --data /tmp/typo.parquet: exit 2 and runs/x intact,
    with and without --overwrite (validation comes before anything in the dir changes)."""
    cfg, out = finished_run
    before = snapshot(out)
    typo = str(tmp_path / 'typo.parquet')
    for extra in ([], ['--overwrite']):
        assert main(['--config', cfg, '--output-dir', str(out), '--data', typo] + extra) == 2
        assert 'matches no file' in capsys.readouterr().err
        assert snapshot(out) == before


@pytest.mark.slow
def test_data_without_a_readable_image_is_named_and_keeps_the_run(finished_run, tmp_path, capsys):
    cfg, out = finished_run
    before = snapshot(out)
    bad = _parquet(tmp_path / 'garbage.parquet', [{'bytes': b'not an image', 'path': None}] * 3)
    assert main(['--config', cfg, '--output-dir', str(out), '--data', bad, '--overwrite']) == 2
    err = capsys.readouterr().err
    assert 'garbage.parquet' in err and 'no readable image' in err and 'figure' not in err
    assert 'Traceback' not in err
    assert snapshot(out) == before


@pytest.mark.slow
def test_rerun_into_a_run_dir_is_refused_without_overwrite(finished_run, capsys):
    cfg, out = finished_run
    before = snapshot(out)
    assert main(['--config', cfg, '--output-dir', str(out)]) == 2
    assert 'already holds a run' in capsys.readouterr().err
    assert snapshot(out) == before


@pytest.mark.slow
def test_stage2_overwrite_checks_the_stage1_generator_first(finished_run, tmp_path, capsys):
    """A stage-2-only --overwrite run validates its stage-1 generator (readable, E/D shapes of this config) before
    the earlier run is moved; the stage-1 file it starts from stays in place."""
    cfg, out = finished_run
    before = snapshot(out)
    assert main(['--config', cfg, '--output-dir', str(out), '--stage', '2', '--overwrite',
                 '--set', f'init_generator={cfg}']) == 2
    assert 'cannot read the stage-1 generator' in capsys.readouterr().err
    assert main(['--config', cfg, '--output-dir', str(out), '--stage', '2', '--overwrite',
                 '--set', 'gen_widths=[8,8,8,8]']) == 2
    assert 'does not fit' in capsys.readouterr().err
    assert snapshot(out) == before
    assert main(['--config', cfg, '--output-dir', str(out), '--stage', '2', '--overwrite']) == 0
    assert (out / 'damage_repair_generator_stage1.safetensors').read_bytes() == \
        before['damage_repair_generator_stage1.safetensors']


def test_demo_overwrite_does_not_leak_into_other_output_dirs(tmp_path):
    """demo.yaml's 'start afresh' applies only to the demo's own dir (runs/demo), not to any --output-dir, and a
    saved config.yaml never carries overwrite: true."""
    assert config_from_args([])[0].run.overwrite is True  # plain `python train_scripts/pretrain.py`
    assert config_from_args(['--output-dir', str(tmp_path / 'mine')])[0].run.overwrite is False
    assert config_from_args(['--output-dir', str(tmp_path / 'mine'), '--overwrite'])[0].run.overwrite is True
    assert C.load_yaml(C.DEMO_CONFIG).get('overwrite') in (None, False)


@pytest.mark.slow
def test_overwrite_replaces_the_earlier_run_only_after_the_new_one_checkpoints(finished_run, capsys):
    cfg, out = finished_run
    (out / 'figures' / 'mine.png').write_bytes(b'old figure')
    assert main(['--config', cfg, '--output-dir', str(out), '--overwrite', '--set', 'seed=1']) == 0
    text = capsys.readouterr().out
    assert 'moved to' in text
    assert not (out / 'figures' / 'mine.png').exists()  # the earlier run is gone ...
    assert not [p for p in out.iterdir() if p.name.startswith('.replaced-')]  # ... deleted last
    assert yaml.safe_load((out / 'config.yaml').read_text())['seed'] == 1
    assert yaml.safe_load((out / 'config.yaml').read_text())['overwrite'] is False


@pytest.mark.slow
def test_overwrite_keeps_the_earlier_run_aside_when_the_new_one_fails(finished_run, monkeypatch, capsys):
    cfg, out = finished_run
    before = snapshot(out)
    from train_scripts import trainer

    def boom(self, *a, **k):
        raise KeyboardInterrupt  # killed before its first checkpoint
    monkeypatch.setattr(trainer.Pretrainer, 'run_stage', boom)
    assert main(['--config', cfg, '--output-dir', str(out), '--overwrite']) == 130  # Ctrl-C: one line (issue 22)
    aside = [p for p in out.iterdir() if p.name.startswith('.replaced-')]
    assert len(aside) == 1
    kept = snapshot(aside[0])
    for name in WEIGHTS + ('metrics.jsonl', 'model_args.json'):
        assert kept[name] == before[name]


# ------------------------------------------------------------------------------------------------ 2. unpickling
class _Evil:
    def __reduce__(self):
        return (os.system, (f'touch {os.environ["TIMM_SPOT_EVIL_MARKER"]}',))


def test_rank_state_is_never_unpickled(tmp_path, monkeypatch):
    """A crafted rank_state_0.pt ran os.system on --resume (weights_only=False)."""
    from train_scripts.checkpoint import load_process_state

    marker = tmp_path / 'pwned'
    monkeypatch.setenv('TIMM_SPOT_EVIL_MARKER', str(marker))
    ckpt = tmp_path / 'ckpt'
    ckpt.mkdir()
    torch.save({'history': _Evil()}, str(ckpt / 'rank_state_0.pt'))
    error = None
    try:
        load_process_state(str(ckpt), 0)
    except Exception as e:  # noqa: BLE001
        error = e
    assert not marker.exists()  # no code ran
    assert error is not None and 'rank_state_0.pt' in str(error) and str(ckpt) in str(error)


@pytest.mark.slow
def test_real_rank_state_loads_with_weights_only(finished_run):
    _, out = finished_run
    for path in (out / 'checkpoints').glob('stage*/rank_state_0.pt'):
        state = torch.load(str(path), weights_only=True)
        assert {'history', 'stream', 'meters'} <= set(state)


# ------------------------------------------------------------------------------------------------ 3, 11. resume
@pytest.mark.slow
@pytest.mark.parametrize('flag,value,old', [(['--img-size', '64'], 64, 32),
                                            (['--set', 'gen_widths=[16,32,64,128]'], [16, 32, 64, 128],
                                             [8, 16, 32, 64]),
                                            (['--batch-size', '2'], 2, 4)])
def test_resume_with_a_changed_shape_option_changes_nothing(finished_run, capsys, flag, value, old):
    cfg, out = finished_run
    before = snapshot(out)
    assert main(['--output-dir', str(out), '--resume'] + flag) == 2
    err = capsys.readouterr().err.strip()
    key = {'--img-size': 'img_size', '--set': 'gen_widths', '--batch-size': 'batch_size'}[flag[0]]
    assert key in err and repr(value) in err and repr(old) in err and len(err.splitlines()) == 1
    assert snapshot(out) == before  # config.yaml not rewritten
    assert main(['--output-dir', str(out), '--resume']) == 0  # the plain resume still works


# ------------------------------------------------------------------------------------------------ 6. disk full
@pytest.mark.slow
def test_disk_full_names_disk_space_and_the_kept_checkpoint(tmp_path, monkeypatch, capsys):
    import accelerate

    real = accelerate.Accelerator.save_state
    calls = []

    def full_disk(self, output_dir=None, **kw):
        calls.append(output_dir)
        if len(calls) == 2:
            real(self, output_dir, **kw)  # a partial checkpoint, then the write fails
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4304')
        return real(self, output_dir, **kw)
    monkeypatch.setattr(accelerate.Accelerator, 'save_state', full_disk)
    out = tmp_path / 'full'
    assert main(['--config', tiny_config(tmp_path, stage1_steps=3), '--output-dir', str(out)]) == 4
    err = capsys.readouterr().err
    assert 'no space left' in err and 'free' in err and 'stage1_step0000001' in err and '--resume' in err
    assert not [p for p in (out / 'checkpoints').iterdir() if p.name.startswith('.tmp-')]  # space given back


# ------------------------------------------------------------------------------------------------ 7. corruption
def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_checkpoint_metadata_holds_checksums(finished_run):
    _, out = finished_run
    for ckpt in (out / 'checkpoints').glob('stage*'):
        files = json.loads((ckpt / 'meta.json').read_text())['files']
        assert 'model.safetensors' in files and 'rank_state_0.pt' in files and len(files[
            'model.safetensors']) == 64


@pytest.mark.slow
def test_flipped_bit_in_the_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    cfg = tiny_config(tmp_path, stage1_steps=1, stage2_steps=2, keep_checkpoints=2)
    out = tmp_path / 'run'
    assert main(['--config', cfg, '--output-dir', str(out), '--max-steps', '2']) == 0
    ckpts = out / 'checkpoints'
    assert sorted(p.name for p in ckpts.glob('stage*')) == ['stage2_step0000001', 'stage2_step0000002']
    _flip_byte(ckpts / 'stage2_step0000002' / 'model.safetensors')
    capsys.readouterr()
    assert main(['--output-dir', str(out), '--resume']) == 0
    text = capsys.readouterr()
    text = text.out + text.err
    assert 'skipping checkpoint' in text and 'stage2_step0000002' in text and 'model.safetensors' in text
    assert 'resumed from' in text and 'stage2_step0000001' in text
    assert (ckpts / 'corrupt-stage2_step0000002').is_dir()  # kept for inspection
    assert json.loads((ckpts / 'latest').read_text())['name'] == 'stage2_step0000002'  # re-done


@pytest.mark.slow
@pytest.mark.parametrize('victim', ['model.safetensors', 'optimizer.bin', 'rank_state_0.pt'])
def test_truncated_checkpoint_file_is_named_without_traceback(finished_run, capsys, victim):
    _, out = finished_run
    ckpts = out / 'checkpoints'
    for ckpt in ckpts.glob('stage*'):  # every checkpoint broken: nothing to fall back to
        path = ckpt / victim
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    assert main(['--output-dir', str(out), '--resume']) == 2
    err = capsys.readouterr().err
    assert victim in err and 'stage2_step0000001' in err and 'Traceback' not in err


@pytest.mark.slow
def test_truncated_file_in_a_checkpoint_without_checksums_is_named(finished_run, capsys):
    """Checkpoints of earlier versions carry no checksums: structural checks still name the file."""
    _, out = finished_run
    for ckpt in (out / 'checkpoints').glob('stage*'):
        meta = json.loads((ckpt / 'meta.json').read_text())
        meta.pop('files')
        (ckpt / 'meta.json').write_text(json.dumps(meta))
        path = ckpt / 'optimizer.bin'
        path.write_bytes(path.read_bytes()[:-50])
    assert main(['--output-dir', str(out), '--resume']) == 2
    assert 'optimizer.bin' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 8, 10. config
@pytest.mark.parametrize('override,key', [
    ({'history': 'false'}, 'history'), ({'gate': 'no'}, 'gate'), ({'hflip': 1}, 'hflip'),
    ({'history_batches': -1}, 'history_batches'), ({'lr': 'abc'}, 'lr'), ({'crop_scale': 0.5}, 'crop_scale'),
    ({'gen_widths': 64}, 'gen_widths'), ({'threads': -3}, 'threads'), ({'stage1_epochs': -2}, 'stage1_epochs'),
    ({'batch_size': True}, 'batch_size'), ({'img_size': 32.5}, 'img_size'), ({'theta': float('nan')}, 'theta'),
])
def test_wrong_typed_config_values_name_the_key(override, key):
    with pytest.raises(C.ConfigError, match=key) as info:
        C.resolve(override)
    assert repr(list(override.values())[0]) in str(info.value)


def test_numbers_quoted_by_yaml_still_work():
    assert C.resolve({'lr': '3e-4'}).optim.lr == pytest.approx(3e-4)  # PyYAML reads 3e-4 as a string
    assert C.resolve({'history': False}).method.history is False


@pytest.mark.parametrize('argv,words', [
    (['--set', 'lr=abc'], ['lr', "'abc'"]),
    (['--stage1-epochs', '-2'], ['stage1_epochs', '-2']),
    (['--set', 'threads=-3'], ['threads', '-3']),
    (['--set', 'crop_scale=0.5'], ['crop_scale', '0.5']),
    (['--set', 'history="false"'], ['history', "'false'"]),
])
def test_cli_config_mistakes_are_one_line_with_exit_code_2(tmp_path, capsys, argv, words):
    assert main(['--output-dir', str(tmp_path / 'o')] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / 'o').exists()


def test_malformed_yaml_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('img_size: 32\ngen_widths: [8, 16\nseed: 1\n')
    assert main(['--config', str(bad), '--output-dir', str(tmp_path / 'o')]) == 2
    err = capsys.readouterr().err
    assert 'bad.yaml' in err and 'not valid YAML' in err and 'line' in err and 'Traceback' not in err


def test_probe_refuses_non_integer_labels(tmp_path):
    import datasets

    from timm_spot.eval.labelled import load_labelled

    path = tmp_path / 'f.parquet'
    datasets.Dataset.from_dict({'image': [_png()] * 4, 'y': [0.0, 1.5, 2.0, 0.7]}).to_parquet(str(path))
    with pytest.raises(ValueError, match=r"label column 'y'.*non-integer.*1\.5"):
        load_labelled(str(path), label_column='y')
    datasets.Dataset.from_dict({'image': [_png()] * 4, 'y': [0.0, 1.0, 2.0, 1.0]}).to_parquet(str(path))
    assert load_labelled(str(path), label_column='y').labels.tolist() == [0, 1, 2, 1]


# ------------------------------------------------------------------------------------------------ 9. NaN weights
def _discriminator_file(tmp_path, name='d.safetensors', nan=False, model_args=None, **kwargs):
    from safetensors.torch import save_file

    kwargs.setdefault('head_kernel_size', 4)
    model = timm.create_model('alexnet_spot_discriminator', **kwargs)
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    if nan:
        for k in state:
            if state[k].is_floating_point():
                state[k].fill_(float('nan'))
    folder = tmp_path / name.replace('.safetensors', '')
    folder.mkdir()
    path = folder / name
    save_file(state, str(path))
    if model_args is not None:
        (folder / 'model_args.json').write_text(json.dumps(model_args))
    return str(path)


def test_spot_with_nan_weights_is_an_error(tmp_path, capsys):
    from timm_spot.cli import main as cli

    photo = tmp_path / 'p.png'
    Image.new('RGB', (80, 64), (100, 150, 200)).save(photo)
    weights = _discriminator_file(tmp_path, nan=True)
    assert cli(['spot', str(photo), '--weights', weights, '--out', str(tmp_path / 'o.png')]) == 2
    err = capsys.readouterr().err
    assert 'non-finite' in err and 'd.safetensors' in err and 'nan' not in capsys.readouterr().out


def test_probe_with_nan_weights_or_features_is_an_error(tmp_path):
    from safetensors.torch import save_file

    from timm_spot.eval.features import FeatureSet, create_backbone
    from timm_spot.eval.probe import train_linear_probes

    model = timm.create_model('alexnet_spot')
    state = {k: (torch.full_like(v, float('nan')) if v.is_floating_point() else v).contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / 'nan.safetensors'))
    with pytest.raises(ValueError, match='non-finite'):
        create_backbone('alexnet_spot', str(tmp_path / 'nan.safetensors'))
    x = torch.randn(6, 4)
    x[2, 1] = float('nan')
    fs = FeatureSet(['conv1'], [x], torch.tensor([0, 1, 2, 0, 1, 2]), torch.arange(6), [(1, 1)])
    with pytest.raises(ValueError, match='conv1.*non-finite'):
        train_linear_probes(fs, fs, 3)


# ------------------------------------------------------------------------------------------------ 10. images, hub
def test_spot_on_a_decompression_bomb_says_so(tmp_path, monkeypatch, capsys):
    from timm_spot.cli import main as cli

    photo = tmp_path / 'huge.png'
    Image.new('RGB', (100, 100)).save(photo)
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # 10000 px > 2 x limit: PIL refuses, as 14000^2 does
    assert cli(['spot', str(photo), '--img-size', '64']) == 2
    err = capsys.readouterr().err
    assert 'huge.png' in err and 'decompression-bomb' in err and 'not an image' not in err


def _hub_folder(tmp_path) -> Path:
    """An exported alexnet_spot folder (from a fake run) with a hidden .env beside the files."""
    from safetensors.torch import save_file

    from hub.export import export_run

    run = tmp_path / 'fake-run'
    run.mkdir()
    model = timm.create_model('alexnet_spot')
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run / 'alexnet_spot.safetensors'))
    (run / 'model_args.json').write_text(json.dumps({'alexnet_spot': {}, 'img_size': 64}))
    (run / 'config.yaml').write_text('data: builtin\nimg_size: 64\n')
    export_run(run, tmp_path / 'hub', verify=False, log=None, tag='test')
    return tmp_path / 'hub' / 'alexnet_spot.test'


def test_publish_uploads_exactly_the_listed_files(tmp_path):
    from hub.publish import publish_folder

    folder = _hub_folder(tmp_path)
    (folder / '.env').write_text('HF_TOKEN=secret')
    (folder / '.cache').mkdir()
    (folder / '.cache' / 'x').write_text('junk')

    class Api:
        def create_repo(self, repo_id, **kw):
            return type('R', (), {'repo_id': repo_id})()

        def create_commit(self, **kw):
            self.kw = kw
            return type('C', (), {'oid': 'a' * 40, 'commit_url': 'u', 'pr_url': None})()

    api = Api()
    summary = publish_folder(folder, 'someone/alexnet_spot.test', api=api, log=None)
    listed = sorted(f['path'] for f in summary['files'])
    uploaded = sorted(op.path_in_repo for op in api.kw['operations'])
    assert uploaded == listed and '.env' not in uploaded and 'allow_patterns' not in api.kw


def test_publish_without_network_is_one_clear_line(tmp_path, capsys):
    from hub.publish import publish_folder

    folder = _hub_folder(tmp_path)

    class Offline:
        def create_repo(self, repo_id, **kw):
            raise ConnectionError("HTTPSConnectionPool(host='huggingface.co', port=443): Max retries exceeded")

    with pytest.raises(RuntimeError, match='cannot reach the Hugging Face Hub') as info:
        publish_folder(folder, 'someone/alexnet_spot.test', api=Offline(), log=None)
    assert len(str(info.value).splitlines()) == 1 and 'nothing was uploaded' in str(info.value)


# ------------------------------------------------------------------------------------------------ 5. hub export
def test_export_replaces_the_folder_by_rename_and_deletes_last(tmp_path, monkeypatch):
    """A kill between removing the old folder and moving the new one in must not lose the released folder."""
    from hub import export as export_mod

    folder = _hub_folder(tmp_path)
    before = snapshot(folder)
    real_replace = os.replace

    def killed(src, dst):
        if str(src).endswith('.export-tmp'):
            raise KeyboardInterrupt  # the kill, at the worst moment
        return real_replace(src, dst)
    monkeypatch.setattr(export_mod.os, 'replace', killed)
    with pytest.raises(KeyboardInterrupt):
        export_mod.export_run(tmp_path / 'fake-run', tmp_path / 'hub', verify=False, log=None, tag='test')
    survivors = [p for p in (folder, folder.parent / '.alexnet_spot.test.export-old') if p.is_dir()]
    assert survivors and snapshot(survivors[0]) == before
    monkeypatch.setattr(export_mod.os, 'replace', real_replace)
    export_mod.export_run(tmp_path / 'fake-run', tmp_path / 'hub', verify=False, log=None, tag='test')
    assert snapshot(folder).keys() == before.keys()
    assert not (folder.parent / '.alexnet_spot.test.export-old').exists()


# ------------------------------------------------------------------------------------------------ 12. images
def test_exif_orientation_is_applied():
    from timm_spot.data import decode_image

    im = Image.new('RGB', (60, 20), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    for fmt in ('JPEG', 'PNG'):
        buf = io.BytesIO()
        im.save(buf, format=fmt, exif=exif.tobytes())
        assert decode_image({'bytes': buf.getvalue(), 'path': None}).size == (20, 60), fmt


def test_very_large_images_are_reduced_while_decoding():
    from timm_spot.data import decode_image
    from timm_spot.data.sources import MAX_DECODE_PIXELS

    buf = io.BytesIO()
    Image.new('RGB', (6000, 4000), (10, 20, 30)).save(buf, format='PNG', compress_level=1)
    image = decode_image({'bytes': buf.getvalue(), 'path': None})
    assert image.width * image.height <= MAX_DECODE_PIXELS and abs(image.width / image.height - 1.5) < 0.01


@pytest.mark.slow
def test_skipped_images_counts_images_once_and_names_them(tmp_path, capsys):
    cells = [{'bytes': _png((i * 20, 0, 0)), 'path': f'ok{i}.png'} for i in range(6)]
    cells[1] = {'bytes': b'broken', 'path': 'broken1.png'}
    cells[2] = {'bytes': b'broken too', 'path': 'broken2.png'}
    data = _parquet(tmp_path / 'two_bad.parquet', cells)
    out = tmp_path / 'run'
    cfg = tiny_config(tmp_path, data=data, stage1_steps=6, stage2_steps=1, checkpoint_every=0, batch_size=4)
    assert main(['--config', cfg, '--output-dir', str(out)]) == 0
    records = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    stage1 = [r for r in records if r['stage'] == 1]
    assert stage1[-1]['skipped_images'] == 2  # two unreadable images, however often they were drawn
    err = capsys.readouterr().err
    assert err.count('broken1.png') == 1 and err.count('broken2.png') == 1


# ------------------------------------------------------------------------------------------------ 13. model kwargs
def test_spot_and_gradcam_load_discriminators_with_other_kwargs(tmp_path, capsys):
    from timm_spot.cli import main as cli

    photo = tmp_path / 'p.png'
    Image.new('RGB', (80, 64), (100, 150, 200)).save(photo)
    args = {'head_kernel_size': 4, 'mask_head': False, 'head_hidden_size': 64}
    no_mask = _discriminator_file(tmp_path, 'g.safetensors', model_args={'alexnet_spot_discriminator': args,
                                                                         'img_size': 64}, **args)
    assert cli(['spot', str(photo), '--weights', no_mask, '--out', str(tmp_path / 's.png')]) == 0
    assert 'no mask head' in capsys.readouterr().out
    assert cli(['figure', 'gradcam', str(photo), '--weights', no_mask, '--out', str(tmp_path / 'g.png')]) == 0
    # no model_args.json: --model-args
    os.remove(os.path.join(os.path.dirname(no_mask), 'model_args.json'))
    assert cli(['spot', str(photo), '--weights', no_mask, '--out', str(tmp_path / 's2.png'),
                '--model-args', json.dumps(args)]) == 0

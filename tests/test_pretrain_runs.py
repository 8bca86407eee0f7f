"""End-to-end runs of train_scripts/pretrain.py on CPU at tiny sizes: the default job, loss weights in the logged
metrics, frozen E/D in stage 2, NaN stop, bitwise resume after SIGKILL, 2-process Accelerate run, ablations."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import timm
import timm_spot  # noqa: F401
from train_scripts.pretrain import main

# every test here is a pretraining run (most in a subprocess): the slow lane
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / 'train_scripts' / 'pretrain.py')
WEIGHT_FILES = ('alexnet_spot.safetensors', 'alexnet_spot_discriminator.safetensors',
                'damage_repair_generator.safetensors', 'damage_repair_generator_stage1.safetensors')

TINY = dict(
    data='builtin', img_size=32, batch_size=4, gen_stem_width=8, gen_widths=[8, 16, 32, 64],
    discriminator_kwargs={'head_hidden_size': 64}, stage1_steps=4, stage2_steps=4, history_batches=2,
    num_workers=0, threads=1, log_every=1, figure_every=0, checkpoint_every=2, num_figure_images=2,
    progress=False, overwrite=True,
)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_config(tmp_path, **overrides):
    cfg = dict(TINY)
    cfg.update(overrides)
    path = tmp_path / 'tiny.yaml'
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def env():
    e = dict(os.environ)
    e['PYTHONPATH'] = str(REPO) + os.pathsep + e.get('PYTHONPATH', '')
    e['OMP_NUM_THREADS'] = '1'
    return e


def read_metrics(out):
    with open(os.path.join(out, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_default_job_end_to_end_writes_every_output(tmp_path):
    """`python train_scripts/pretrain.py` (the demo config, no --config) with a step limit: every output file,
    weights loadable by timm, the loss weights of the recipe, E/D frozen in stage 2."""
    out = tmp_path / 'demo'
    proc = subprocess.run([sys.executable, SCRIPT, '--max-steps', '2', '--output-dir', str(out), '--no-progress',
                           '--set', 'threads=1', 'log_every=1'],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in WEIGHT_FILES + ('config.yaml', 'metrics.jsonl', 'model_args.json', 'figures/fig3_latest.png',
                                'figures/fig3_stage1_step0000002.png', 'figures/fig3_stage2_step0000002.png',
                                'checkpoints/latest'):
        assert (out / name).is_file(), name
    cfg = yaml.safe_load((out / 'config.yaml').read_text())
    assert cfg['data'] == 'builtin' and cfg['img_size'] == 64  # the demo config
    model_args = json.loads((out / 'model_args.json').read_text())
    for name in ('damage_repair_generator', 'alexnet_spot_discriminator', 'alexnet_spot'):
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(out / f'{name}.safetensors')),
                                  **model_args[name])
        assert sum(p.numel() for p in model.parameters()) > 0
    # loss weights as logged (log_every=1: one step per record, identities hold exactly up to float rounding)
    records = read_metrics(str(out))
    s1 = [r for r in records if r['stage'] == 1]
    s2 = [r for r in records if r['stage'] == 2]
    assert [r['step'] for r in s1] == [1, 2] and [r['step'] for r in s2] == [1, 2]
    for r in s1:
        assert r['ae_rec'] == pytest.approx(30 * r['ae_mse'], rel=1e-5)
        assert r['ae_total'] == pytest.approx(r['ae_rec'] + r['ae_wd'], rel=1e-5)
        assert r['lr'] == pytest.approx(3e-4 - (3e-4 - 3e-6) * (r['step'] - 1) / 150)
    for r in s2:
        assert r['c_total'] == pytest.approx(r['c_class'] + 0.1 * r['c_mask'] + r['c_wd'], rel=1e-5)
        assert r['r_total'] == pytest.approx(r['r_adv'] + 30 * r['r_rec'] + r['r_wd'], rel=1e-5)
        for key in ('acc_real', 'acc_corrupt', 'mask_acc', 'img_per_s', 'skipped_images'):
            assert key in r
        assert r['c_wd'] > 0 and r['r_wd'] > 0
    # stage 2 must not touch E and D (weights and BatchNorm statistics), only R
    stage1 = load_file(str(out / 'damage_repair_generator_stage1.safetensors'))
    final = load_file(str(out / 'damage_repair_generator.safetensors'))
    frozen = [k for k in stage1 if k.startswith(('encoder.', 'decoder.', 'to_rgb.'))]
    assert any('running_mean' in k for k in frozen)
    for k in frozen:
        assert torch.equal(stage1[k], final[k]), k
    assert any(not torch.equal(stage1[k], final[k]) for k in stage1 if k.startswith('repair.'))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, capsys):
    out = tmp_path / 'nan'
    code = main(['--config', tiny_config(tmp_path), '--output-dir', str(out), '--set', 'debug_nan_at=1:3'])
    assert code == 3
    err = capsys.readouterr().err
    assert "'ae_rec'" in err and 'stage 1 step 3' in err and 'stage1_step0000002' in err
    latest = json.loads((out / 'checkpoints' / 'latest').read_text())
    assert latest['name'] == 'stage1_step0000002'
    assert (out / 'checkpoints' / 'stage1_step0000002' / 'model.safetensors').is_file()
    assert not (out / 'damage_repair_generator.safetensors').exists()


def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    """Kill -9 a run after its first stage-2 checkpoint (history buffer filled), resume it, compare with an
    uninterrupted run of the same seed: every tensor of every weight file is equal."""
    cfg = tiny_config(tmp_path, stage1_steps=4, stage2_steps=6, num_workers=1)  # decoding in a worker process
    ref, killed = tmp_path / 'ref', tmp_path / 'killed'
    assert main(['--config', cfg, '--output-dir', str(ref)]) == 0

    proc = subprocess.Popen([sys.executable, SCRIPT, '--config', cfg, '--output-dir', str(killed),
                             '--set', 'debug_step_sleep=0.5'], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = killed / 'checkpoints' / 'latest'
    deadline = time.time() + 240
    while time.time() < deadline:
        if latest.is_file() and 'stage2_step0000002' in latest.read_text():
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail('no stage-2 checkpoint appeared')
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / 'alexnet_spot.safetensors').exists()  # it really died mid-training

    assert main(['--output-dir', str(killed), '--resume']) == 0
    for name in WEIGHT_FILES:
        a, b = load_file(str(ref / name)), load_file(str(killed / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    steps = [(r['stage'], r['step']) for r in read_metrics(str(killed))]
    assert steps == [(r['stage'], r['step']) for r in read_metrics(str(ref))]  # no duplicated records


def test_two_process_accelerate_run(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): disjoint samples per step, identical parameters.

    On a machine without GPUs, Accelerate 1.x starts several CPU processes through its torchrun launcher
    (`--multi_gpu`; its `--cpu` flag multi-processes only through mpirun); the script then selects gloo.
    """
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', str(29500 + os.getpid() % 1000),
           SCRIPT, '--config', tiny_config(tmp_path, stage1_steps=3, stage2_steps=3, debug_dump=True),
           '--output-dir', str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '2 process(es)' in proc.stdout
    r0 = json.loads((out / 'debug' / 'rank0.json').read_text())
    r1 = json.loads((out / 'debug' / 'rank1.json').read_text())
    assert set(r0['samples']) == set(r1['samples']) == {f'{s}:{i}' for s in (1, 2) for i in range(3)}
    for key in r0['samples']:
        assert not set(r0['samples'][key]) & set(r1['samples'][key]), key
    assert r0['param_hash'] == r1['param_hash']
    assert set(r0['param_hash']['2']) == {'discriminator', 'generator'}
    for name in WEIGHT_FILES:
        assert (out / name).is_file()


@pytest.mark.parametrize('ablation', ['k', 'l'])
def test_ablations_without_repair_network_run(tmp_path, ablation):
    """(k) no repair network: only C trains; (l) a DCGAN generator from noise vs C, no autoencoder stage."""
    out = tmp_path / ablation
    assert main(['--config', tiny_config(tmp_path, stage1_steps=2, stage2_steps=2), '--output-dir', str(out),
                 '--ablation', ablation, '--tensorboard']) == 0
    records = read_metrics(str(out))
    stage2 = [r for r in records if r['stage'] == 2]
    assert stage2 and all('c_total' in r for r in stage2)
    assert (out / 'alexnet_spot.safetensors').is_file() and (out / 'tensorboard').is_dir()
    if ablation == 'k':
        assert all('r_total' not in r for r in stage2)
        assert [r for r in records if r['stage'] == 1]
    else:
        assert all('r_adv' in r and r['r_rec'] == 0 for r in stage2)
        assert not [r for r in records if r['stage'] == 1]  # no autoencoder for a plain GAN vs raw images
        assert (out / 'dcgan_generator.safetensors').is_file()


@pytest.mark.parametrize('ablation', ['a', 'b', 'g', 'h', 'i', 'j'])
def test_other_ablations_run(tmp_path, ablation):
    """One step per stage of the other Table 1 presets; the saved generator carries the ablation's kwargs."""
    out = tmp_path / ablation
    assert main(['--config', tiny_config(tmp_path, stage1_steps=1, stage2_steps=2), '--output-dir', str(out),
                 '--ablation', ablation]) == 0
    stage2 = [r for r in read_metrics(str(out)) if r['stage'] == 2]
    assert stage2[-1]['history_fraction'] == (0.0 if ablation == 'j' else 0.5)
    assert ('c_mask' in stage2[-1] and stage2[-1]['c_mask'] == 0.0) if ablation == 'g' else stage2[-1]['c_mask'] > 0
    args = json.loads((out / 'model_args.json').read_text())
    model = timm.create_model('damage_repair_generator', pretrained=True, **args['damage_repair_generator'],
                              pretrained_cfg_overlay=dict(file=str(out / 'damage_repair_generator.safetensors')))
    assert model.theta == 0.5


def test_stage2_only_run_starts_from_the_stage1_generator(tmp_path):
    """`--stage 1`, then `--stage 2 --resume` in the same dir: stage 2 loads damage_repair_generator_stage1 and
    leaves its E/D untouched."""
    out = tmp_path / 'split'
    cfg = tiny_config(tmp_path, stage1_steps=2, stage2_steps=2)
    assert main(['--config', cfg, '--output-dir', str(out), '--stage', '1']) == 0
    assert not (out / 'alexnet_spot.safetensors').exists()
    assert main(['--output-dir', str(out), '--stage', '2', '--resume']) == 0
    stage1 = load_file(str(out / 'damage_repair_generator_stage1.safetensors'))
    final = load_file(str(out / 'damage_repair_generator.safetensors'))
    assert all(torch.equal(stage1[k], final[k]) for k in stage1 if k.startswith(('encoder.', 'decoder.')))
    assert (out / 'alexnet_spot.safetensors').is_file()


def test_bad_image_column_fails_fast_naming_it(tmp_path, capsys):
    code = main(['--config', tiny_config(tmp_path), '--output-dir', str(tmp_path / 'bad'),
                 '--image-column', 'pixels'])
    assert code == 2
    assert "'pixels'" in capsys.readouterr().err

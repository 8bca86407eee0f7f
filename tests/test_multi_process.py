"""Multi-process semantics: stage lengths that do not shrink with the process count, the learning-rate rule for the
global batch, fp16 refused for stage 2 (one GradScaler, two optimizers), and the DDP traps with 2 gloo processes on
the CPU (C's BatchNorm run twice per iteration; C's parameters left trainable while R's loss passes through C)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_scripts import config as C
from train_scripts.optim import batch_lr_factor, learning_rate

ROOT = Path(__file__).resolve().parents[1]


def test_lr_rule_for_the_global_batch():
    base = C.resolve({}).optim
    assert learning_rate(0, 100, base, 512) == pytest.approx(3e-4)  # 'none': today's rule, whatever the batch
    sqrt = C.resolve({'lr_scaling': 'sqrt', 'lr_reference_batch': 64}).optim
    assert batch_lr_factor(sqrt, 256) == pytest.approx(2.0)
    assert learning_rate(0, 100, sqrt, 256) == pytest.approx(6e-4)
    assert learning_rate(100, 100, sqrt, 256) == pytest.approx(6e-6)  # the schedule's end scales alike
    linear = C.resolve({'lr_scaling': 'linear', 'lr_reference_batch': 64}).optim
    assert learning_rate(0, 100, linear, 32) == pytest.approx(1.5e-4)
    assert learning_rate(0, 100, linear, None) == pytest.approx(3e-4)


def test_fp16_is_refused_for_stage_2_only():
    with pytest.raises(C.ConfigError, match='GradScaler'):
        C.resolve({'mixed_precision': 'fp16'})
    assert C.resolve({'mixed_precision': 'fp16', 'stage': 1}).run.mixed_precision == 'fp16'


class _Acc:
    def __init__(self, world):
        self.process_index, self.num_processes = 0, world

    def main_process_first(self):
        import contextlib
        return contextlib.nullcontext()


@pytest.mark.parametrize('world', [1, 2, 4])
def test_stage_lengths_in_epochs_keep_their_images_and_steps_keep_their_steps(world):
    from train_scripts.run_data import RunData
    epochs = RunData(C.resolve({'batch_size': 2, 'stage1_epochs': 3, 'stage2_epochs': 2}), _Acc(world), None)
    epochs.open()
    n = epochs.n_images
    for stage, e in ((1, 3), (2, 2)):  # images per stage: epochs x dataset, to within a global batch (drop-last)
        images = epochs.totals[stage] * 2 * world
        assert e * (n - 2 * world) <= images <= e * n
    steps = RunData(C.resolve({'batch_size': 2, 'stage1_steps': 7, 'stage2_steps': 5}), _Acc(world), None)
    steps.open()
    assert steps.totals == {1: 7, 2: 5}  # optimizer steps, whatever the process count


@pytest.mark.slow
@pytest.mark.parametrize('objective', ['paper', 'code'])
def test_ddp_two_gloo_processes_keep_the_networks_in_step(objective, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT), MASTER_ADDR='127.0.0.1')
    env.pop('CUDA_VISIBLE_DEVICES', None)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port',
                           str(29500 + os.getpid() % 1000 + (objective == 'code')), str(ROOT / 'tests' / 'ddp_worker.py'),
                           objective], capture_output=True, text=True, env=env, timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(p.read_text()) for p in sorted(tmp_path.glob('rank*_*.json'))]
    assert len(rows) == 4 and all(r['world'] == 2 for r in rows)
    for kind in ('reference', 'fast'):
        r0, r1 = [r for r in rows if r['kind'] == kind]
        # different data per process, so equal parameters mean DDP averaged every gradient (C's and R's); C's
        # BatchNorm running statistics are not: DDP broadcasts process 0's at each C forward, which then updates them
        # with the local batch (the checkpoint saves process 0's)
        assert (r0['c_params'], r0['r_params']) == (r1['c_params'], r1['r_params'])
        assert r0['c_buffers'] != r1['c_buffers']
        assert r0['r_grad_requires'] and r1['r_grad_requires']
    fast = [r for r in rows if r['kind'] == 'fast'][0]
    ref = [r for r in rows if r['kind'] == 'reference'][0]
    # on the CPU the fast step's device draws are the reference's host draws (same seeds, CPU generators): the
    # same networks under DDP too
    assert (fast['c_params'], fast['r_params']) == (ref['c_params'], ref['r_params'])

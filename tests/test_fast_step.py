"""The fast stage steps (train_scripts/fast_step.py) against the reference steps (stages.py) on the CPU: in float32,
same seed, same batches, masks and history picks, a few steps give the same losses and parameters. Also: the device
history buffer, the deferred NaN check, fp16 refused, a failed compile is an error."""
from __future__ import annotations

import pytest
import torch

from timm_spot.run_layout import RunLayout
from train_scripts.batches import TAG_HISTORY, TAG_MASK, TAG_TORCH, derive_seed, torch_generator
from train_scripts.config import resolve
from train_scripts.context import StepContext, make_accelerator
from train_scripts.fast_step import (CompileError, Compiled, DeviceMeters, FastStage1, FastStage2,
                                     refuse_fp16)
from train_scripts.history import HistoryBuffer
from train_scripts.networks import NetworkBuilder
from train_scripts.optim import NonFiniteLossError
from train_scripts.stages import Stage1, Stage2

SEED, B, S = 5, 4, 32
STEPS = 4
TINY = dict(img_size=S, batch_size=B, gen_stem_width=8, gen_widths=[8, 16, 16, 16], history_batches=2,
            mixed_precision='no', channels_last=False, cpu=True, threads=1, progress=False, seed=SEED,
            fused_adam=False)


def _contexts(tmp_path, **over):
    cfg = resolve({**TINY, 'output_dir': str(tmp_path), **over})
    acc, _, channels_last = make_accelerator(cfg, RunLayout(str(tmp_path)))
    out = []
    for _ in ('reference', 'fast'):
        networks = NetworkBuilder(cfg, acc.device)
        history = HistoryBuffer(cfg.method.history_batches * B, cfg.method.history_fraction, enabled=cfg.method.history)
        out.append(StepContext(cfg, acc, networks, history, {1: 50, 2: 50}, generator=networks.create_generator(),
                               channels_last=channels_last))
    return cfg, out


def _batch(step):
    return torch.rand(B, 3, S, S, generator=torch.Generator().manual_seed(100 + step)) * 2 - 1


def _reference_mask(stage, step):
    return stage.gen.sample_mask(B, stage.t.grid, stage.source.theta,
                                 generator=torch_generator(SEED, 2, step, 0, TAG_MASK))


def _run_both(tmp_path, perturb_mask=False, **over):
    cfg, (ref_ctx, fast_ctx) = _contexts(tmp_path, **over)
    ref, fast = Stage2(ref_ctx), FastStage2(fast_ctx, read_every=1)
    for stage in (ref, fast):
        stage.set_modes()
    losses = []
    for step in range(STEPS):
        x = _batch(step)
        torch.manual_seed(derive_seed(SEED, 2, step, 0, TAG_TORCH))
        r = {k: float(v) for k, v in ref.step(step, x).items()}
        mask = _reference_mask(ref, step)
        if perturb_mask and step == 0:
            mask = 1 - mask
        torch.manual_seed(derive_seed(SEED, 2, step, 0, TAG_TORCH))
        f = fast.step(step, x, mask=mask, history_generator=torch_generator(SEED, 2, step, 0, TAG_HISTORY))
        losses.append((r, f))
    return ref, fast, losses


def _params(stage):
    return [p.detach().clone() for p in list(stage.disc.parameters()) + list(stage.gen.repair_parameters())]


@pytest.mark.parametrize('objective', ['paper', 'code', 'anti_shortcut'])
def test_fast_stage2_equals_the_reference_step(tmp_path, objective):
    ref, fast, losses = _run_both(tmp_path, objective=objective)
    assert fast.t.cfg.method.update == ('joint' if objective == 'code' else 'sequential')
    for step, (r, f) in enumerate(losses):
        for key in ('c_class', 'c_mask', 'c_total', 'r_adv', 'r_rec', 'r_total', 'history_fraction'):
            assert f[key] == pytest.approx(r[key], rel=1e-5, abs=1e-7), (step, key)
        for key in ('acc_real', 'acc_corrupt', 'mask_acc', 'lr'):  # monitors on read steps (every step here)
            assert f[key] == pytest.approx(r[key], abs=1e-6), (step, key)
    moved = 0
    for p_ref, p_fast, p0 in zip(_params(ref), _params(fast), _params(Stage2(_contexts(tmp_path / 'init')[1][0]))):
        torch.testing.assert_close(p_fast, p_ref, rtol=1e-5, atol=1e-7)
        moved += int(not torch.equal(p_ref, p0))
    assert moved > 10  # the steps did train both networks
    # C's BatchNorm running statistics: updated by the C step only, in both
    for (n, b_ref), b_fast in zip(ref.disc.named_buffers(), fast.disc.buffers()):
        torch.testing.assert_close(b_fast, b_ref, rtol=1e-5, atol=1e-7, msg=n)


def test_the_equivalence_test_sees_a_different_mask(tmp_path):
    ref, fast, _ = _run_both(tmp_path, perturb_mask=True)
    diffs = [float((a - b).abs().max()) for a, b in zip(_params(ref), _params(fast))]
    assert max(diffs) > 1e-4


def test_fast_stage1_equals_the_reference_step(tmp_path):
    cfg, (ref_ctx, fast_ctx) = _contexts(tmp_path)
    ref, fast = Stage1(ref_ctx), FastStage1(fast_ctx, read_every=1)
    for step in range(STEPS):
        x = _batch(step)
        torch.manual_seed(derive_seed(SEED, 1, step, 0, TAG_TORCH))
        r = ref.step(step, x)
        torch.manual_seed(derive_seed(SEED, 1, step, 0, TAG_TORCH))
        f = fast.step(step, x)
        assert f['ae_rec'] == pytest.approx(float(r['ae_rec']), rel=1e-5)
        assert f['ae_mse'] == pytest.approx(float(r['ae_mse']), rel=1e-5)
    for a, b in zip(ref.gen.autoencoder_parameters(), fast.gen.autoencoder_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_history_keeps_the_rule_with_the_generators_draws():
    h = HistoryBuffer(capacity=8, fraction=0.5)
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        images = torch.full((4, 3, 2, 2), float(i))
        out, masks, from_history = h.mix(images, torch.full((4, 1, 1, 1), float(i)), g)
        assert int(from_history.sum()) == (0 if i == 0 else 2)
        assert torch.equal(out[~from_history], images[~from_history])
        assert (out[from_history] < i).all()  # history entries are older images, with their own masks
        assert torch.equal(masks[:, 0, 0, 0], out[:, 0, 0, 0])
    assert h.size == 8


def test_deferred_nan_check_names_the_loss_and_steps():
    meters = DeviceMeters(2)
    meters.add(3, {'c_total': torch.tensor(1.0), 'r_total': torch.tensor(2.0)})
    meters.add(4, {'c_total': torch.tensor(3.0), 'r_total': torch.tensor(float('nan'))})
    with pytest.raises(NonFiniteLossError, match=r"'r_total' in 1 of stage 2 steps 3\.\.4"):
        meters.read(4)
    meters.add(5, {'c_total': torch.tensor(1.0), 'r_total': torch.tensor(2.0)})
    meters.add(6, {'c_total': torch.tensor(3.0), 'r_total': torch.tensor(4.0)})
    assert meters.read(6) == {'c_total': 2.0, 'r_total': 3.0}


def test_fp16_and_unsupported_ablations_are_refused(tmp_path):
    class Acc:
        mixed_precision = 'fp16'
    with pytest.raises(ValueError, match='GradScaler'):
        refuse_fp16(type('T', (), {'accelerator': Acc()})())
    _, (_, ctx) = _contexts(tmp_path, repair='none')
    with pytest.raises(ValueError, match='reference step'):
        FastStage2(ctx)


def test_a_failed_compile_is_an_error_naming_the_part():
    def breaks(x):
        print('a graph break')  # fullgraph: dynamo cannot trace a print
        return x + 1
    with pytest.raises(CompileError, match='torch.compile of the test part failed'):
        Compiled(breaks, 'the test part', backend='eager')(torch.ones(2))
    assert torch.equal(Compiled(lambda x: x * 2, 'fine', backend='eager')(torch.ones(2)), torch.full((2,), 2.0))


def test_on_the_cpu_the_device_draws_are_the_reference_draws(tmp_path):
    """Masks and history picks drawn by the fast step itself (device generators; here the CPU's) come from the seeds
    of the reference's host draws: on the CPU both steps train the same networks without handing draws over."""
    _, (ref_ctx, fast_ctx) = _contexts(tmp_path)
    ref, fast = Stage2(ref_ctx), FastStage2(fast_ctx, read_every=2)
    for stage in (ref, fast):
        stage.set_modes()
    for step in range(STEPS):
        for stage in (ref, fast):
            torch.manual_seed(derive_seed(SEED, 2, step, 0, TAG_TORCH))
            stage.step(step, _batch(step))
    for a, b in zip(_params(ref), _params(fast)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_compiled_parts_trace_as_one_graph_each_and_train_the_same(tmp_path):
    """compile=True: E/D, R and C with L_C each trace as one graph (fullgraph; dynamo's 'eager' backend here, so the
    test checks the tracing, not inductor's kernels) and the steps equal the reference's."""
    _, (ref_ctx, fast_ctx) = _contexts(tmp_path)
    ref, fast = Stage2(ref_ctx), FastStage2(fast_ctx, read_every=1, compile=True, compile_backend='eager')
    assert isinstance(fast.c_forward, Compiled) and isinstance(fast.repair, Compiled)
    for stage in (ref, fast):
        stage.set_modes()
    for step in range(3):
        for stage in (ref, fast):
            torch.manual_seed(derive_seed(SEED, 2, step, 0, TAG_TORCH))
            stage.step(step, _batch(step))
    for a, b in zip(_params(ref), _params(fast)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)

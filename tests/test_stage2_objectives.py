"""Stage-2 objectives: the presets' weights, R's real-half path, the joint update, the cell-statistics match and the
shortcut monitor (docs/method.md, "Stage-2 objectives and shortcuts")."""
import json
import types
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import timm_spot  # noqa: F401
from train_scripts import config as C
from train_scripts import losses as L
from train_scripts.shortcut import ShortcutMonitor, shortcut_aucs
from train_scripts.stages import Stage2

REPO = Path(__file__).resolve().parents[1]


def test_objective_presets_hold_what_they_claim():
    paper = C.resolve({'objective': 'paper'})
    assert paper.loss.generator_loss == 'nonsaturating' and paper.loss.mask_loss_weight == 0.1
    assert paper.loss.r_coop_weights() == (0.0, 0.0) and paper.loss.rec_loss_weight == 30.0
    assert paper.loss.adv_loss_weight == 1.0 and paper.loss.r_cell_stats_weight == 0.0
    code = C.resolve({'objective': 'code'})
    assert code.loss.generator_loss == 'code' and code.loss.mask_loss_weight == 0.1
    assert code.loss.r_coop_weights() == (1.0, 0.1)  # R's loss sums C's losses at C's weights
    assert code.method.update == 'joint' and code.method.r_real_half_grad
    # the v2 preset is exactly what the release's config resolves to (nulls follow generator_loss: code)
    release = C.resolve(C.load_yaml(str(REPO / 'train_scripts' / 'configs' / 'cifar10_64_release.yaml')))
    v2 = C.resolve({'objective': 'spot_c10_64_v2'})
    assert release.loss.r_coop_weights() == v2.loss.r_coop_weights() == (1.0, 1.0)
    assert release.loss.mask_loss_weight == v2.loss.mask_loss_weight == 1.0
    assert release.method.update == v2.method.update == 'sequential'
    # the defaults are the paper's (the cooperative weights' null resolves to 0 under the paper's loss)
    default, flat = C.resolve({}), C.resolve({}).to_flat()
    assert default.loss.r_coop_weights() == (0.0, 0.0)
    for key, value in C.OBJECTIVES['paper'].items():
        assert flat[key] == value or key.startswith('r_coop'), key
    # a preset is a starting point: later keys win; unknown presets are named
    assert C.resolve({'objective': 'code', 'r_coop_mask_weight': 0.0}).loss.r_coop_weights() == (1.0, 0.0)
    with pytest.raises(C.ConfigError, match='objective must be one of'):
        C.resolve({'objective': 'best'})


def _fake_stage(real_half_grad: bool, **loss):
    """What ``Stage2.repair_loss`` reads: the config, autocast and layout, C, and whether the source has masks."""
    torch.manual_seed(0)
    disc = timm.create_model('alexnet_spot_discriminator', head_kernel_size=2, head_hidden_size=32).train()
    cfg = C.resolve(dict(objective='code', r_real_half_grad=real_half_grad, **loss))
    t = types.SimpleNamespace(cfg=cfg, autocast=lambda: torch.autocast('cpu', enabled=False), memory_format=lambda x: x)
    return types.SimpleNamespace(t=t, w=cfg.loss, disc=disc, source=types.SimpleNamespace(has_masks=True))


@pytest.mark.parametrize('real_half_grad', [True, False])
def test_real_half_reaches_r_only_when_the_config_allows(real_half_grad):
    # only the cooperative class term, whose real half depends on x_hat through C's BatchNorm batch statistics
    stage = _fake_stage(real_half_grad, adv_loss_weight=0.0, rec_loss_weight=0.0, r_coop_mask_weight=0.0)
    b = 4
    x_real = torch.rand(b, 3, 32, 32) * 2 - 1
    x_hat = (torch.rand(b, 3, 32, 32) * 2 - 1).requires_grad_()
    mask = torch.ones(b, 1, 2, 2)
    torch.manual_seed(1)  # the same dropout draws in both forwards
    total, parts = Stage2.repair_loss(stage, x_real, x_hat, x_real, mask, b)
    g_total, = torch.autograd.grad(total, x_hat)
    assert all(p.grad is None for p in stage.disc.parameters())  # C gets nothing from R's loss
    torch.manual_seed(1)
    logits, _ = stage.disc.forward_pretext(torch.cat([x_real, x_hat]))
    real, corrupt = logits[:b], logits[b:]
    g_real, = torch.autograd.grad(L.discriminator_class_loss(real, corrupt.detach()), x_hat, retain_graph=True)
    g_corrupt, = torch.autograd.grad(L.discriminator_class_loss(real.detach(), corrupt), x_hat)
    assert g_real.abs().sum() > 0  # the real half does depend on x_hat (batch statistics)
    if real_half_grad:
        assert torch.allclose(g_total, g_real + g_corrupt, atol=1e-6)
    else:
        assert torch.allclose(g_total, g_corrupt, atol=1e-6)  # zero gradient from the real half


def test_cell_statistics_loss_sees_brightness_and_ignores_kept_cells():
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    mask = (torch.rand(8, 1, 2, 2) > 0.5).float()
    assert L.cell_statistics_loss(x, x, mask).item() == pytest.approx(0.0, abs=1e-6)
    up = L.upsample_mask(mask, (32, 32))
    kept_changed = x + 0.5 * up  # only kept cells change: nothing to match (but the Laplacian's 1-px border)
    assert L.cell_statistics_loss(kept_changed, x, mask).item() < 0.01
    brighter = x + 0.3 * (1 - up)  # dropped cells brighter
    assert L.cell_statistics_loss(brighter, x, mask).item() > 0.5
    flat = x * (1 - 0.8 * (1 - up))  # dropped cells with less contrast
    assert L.cell_statistics_loss(flat, x, mask).item() > 0.5
    x_hat = brighter.clone().requires_grad_()
    L.cell_statistics_loss(x_hat, x, mask).backward()
    assert torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0


def _synthetic(brighten: float, n: int = 128):
    """Real and 'repaired' images drawn from one distribution; dropped cells of the repaired ones brightened."""
    torch.manual_seed(0)

    def draw():
        base = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8), size=64, mode='bilinear') * 1.6 - 0.8
        return (base + 0.05 * torch.randn(n, 3, 64, 64)).clamp(-1, 1)

    x_real, x_hat = draw(), draw()
    mask = (torch.rand(n, 1, 4, 4) > 0.7).float()  # theta 0.7: 1 = kept
    return x_real, x_hat + brighten * (1 - L.upsample_mask(mask, (64, 64))), mask


def test_shortcut_monitor_finds_brightened_repairs_and_nothing_else():
    aucs = shortcut_aucs(*_synthetic(0.25))
    assert aucs['shortcut_image_auc'] > 0.9 and aucs['shortcut_cell_auc'] > 0.9
    aucs = shortcut_aucs(*_synthetic(0.0))
    assert abs(aucs['shortcut_image_auc'] - 0.5) < 0.15 and abs(aucs['shortcut_cell_auc'] - 0.5) < 0.1


def test_shortcut_monitor_reports_c_beside_the_shortcut_and_keeps_state():
    torch.manual_seed(0)
    gen = timm.create_model('damage_repair_generator', stem_width=8, widths=(8, 16, 32, 64)).train()
    gen.set_pretraining_stage(2)
    disc = timm.create_model('alexnet_spot_discriminator', head_kernel_size=2, head_hidden_size=32).train()
    images = torch.rand(16, 3, 32, 32) * 2 - 1
    masks = gen.sample_mask(16, (2, 2), 0.7, generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in list(gen.state_dict().items()) + list(disc.state_dict().items())}
    out = ShortcutMonitor(images, masks, chunk=8)(gen, disc, lambda: torch.autocast('cpu', enabled=False))
    for key in ('shortcut_image_auc', 'shortcut_cell_auc', 'c_image_auc', 'c_cell_auc', 'dropped_brightness_shift'):
        assert 0.0 <= out[key] <= 1.0 or key == 'dropped_brightness_shift', key
    after = dict(list(gen.state_dict().items()) + list(disc.state_dict().items()))
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running statistics untouched
    assert disc.training and gen.training


def _run(tmp_path, name, **over):
    from train_scripts.trainer import Pretrainer

    out = tmp_path / name
    keys = dict(C.load_yaml(str(REPO / 'train_scripts' / 'configs' / 'demo.yaml')), output_dir=str(out),
                stage1_steps=2, stage2_steps=2, gen_stem_width=8, gen_widths=[8, 16, 32, 64], threads=1,
                progress=False, figure_every=0, checkpoint_every=0, log_every=1, mixed_precision='no', history=False,
                shortcut_every=1, shortcut_images=16)
    Pretrainer(C.resolve(dict(keys, **over))).run()
    return out


@pytest.mark.slow
def test_joint_update_takes_both_gradients_at_the_same_c(tmp_path):
    seq = _run(tmp_path, 'seq', objective='code', update='sequential', stage2_steps=1)
    joint = _run(tmp_path, 'joint', objective='code', update='joint', stage2_steps=1)
    d_seq, d_joint = (load_file(str(p / 'alexnet_spot_discriminator.safetensors')) for p in (seq, joint))
    g_seq, g_joint = (load_file(str(p / 'damage_repair_generator.safetensors')) for p in (seq, joint))
    # C's first update does not depend on R: identical; R's differs (it saw C before vs after C's step)
    assert all(torch.equal(d_seq[k], d_joint[k]) for k in d_seq)
    repair = [k for k in g_seq if k.startswith('repair.') and g_seq[k].is_floating_point()]
    assert repair and any(not torch.equal(g_seq[k], g_joint[k]) for k in repair)
    recs = [json.loads(x) for x in (joint / 'metrics.jsonl').read_text().splitlines()]
    last = [r for r in recs if r['stage'] == 2][-1]
    for key in ('shortcut_image_auc', 'shortcut_cell_auc', 'c_image_auc', 'c_cell_auc', 'r_coop_class',
                'r_coop_mask'):
        assert key in last, key


@pytest.mark.slow
def test_shortcut_records_follow_shortcut_every_whatever_log_every(tmp_path):
    out = _run(tmp_path, 'cadence', objective='anti_shortcut', stage2_steps=4, log_every=2, shortcut_every=3)
    recs = [json.loads(x) for x in (out / 'metrics.jsonl').read_text().splitlines()]
    stage2 = {r['step']: r for r in recs if r['stage'] == 2}
    assert sorted(stage2) == [2, 3, 4]  # log steps 2, 4 and the monitor's step 3
    assert [s for s, r in sorted(stage2.items()) if 'shortcut_image_auc' in r] == [3, 4]  # every 3 and at the end
    assert 0.0 <= stage2[3]['shortcut_cell_auc'] <= 1.0 and 'r_cell_stats' in stage2[3]

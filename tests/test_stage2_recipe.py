"""The stage-2 recipe's objectives and the fast paths of the step: values, not just shapes.

* L_R as the authors' code computes it ('code'): its gradient on a corrupt logit drives C towards uncertainty
  (sigmoid = 1/2), unlike the paper's non-saturating loss; its mask term is cooperative.
* the mask head's AUC metric;
* fc6 over the whole conv5 map as a matrix product gives the convolution's outputs and gradients;
* the shared encoder (phi = E(x) once) gives the same real and corrupt images as autoencode / damage_and_repair;
* precision / thread defaults; snapshots of the backbone during stage 2.
"""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import timm
import timm_spot  # noqa: F401
from train_scripts import config as C
from train_scripts import losses as L
from train_scripts.corrupt import RepairForward as RepairStep

REPO = Path(__file__).resolve().parents[1]


def _logit_grad(kind, corrupt_logit):
    real = torch.tensor([0.3])
    corrupt = torch.tensor([corrupt_logit], requires_grad=True)
    x = torch.zeros(1, 3, 16, 16)
    mask = torch.ones(1, 1, 1, 1)
    coop = 1.0 if kind == 'code' else 0.0  # the code's objective includes C's class CE
    total, _ = L.repair_objective(real, corrupt, None, None, x, x, mask, kind=kind, adv_weight=1.0,
                                  rec_weight=0.0, coop_class_weight=coop, coop_mask_weight=0.0)
    total.backward()
    return corrupt.grad.item()


@pytest.mark.parametrize('logit', [-3.0, -0.5, 0.5, 3.0])
def test_code_objective_pushes_corrupt_logits_to_uncertainty(logit):
    g = _logit_grad('code', logit)
    # d/dl [mean over 2 of BCE(l, 0)] + d/dl [mean over 2 of BCE(l, 1)] = (sigmoid(l) - 0 + sigmoid(l) - 1) / 2
    assert g == pytest.approx(torch.sigmoid(torch.tensor(logit)).item() - 0.5, abs=1e-6)
    # gradient descent moves l towards 0 (C uncertain) from both sides
    assert (g > 0) == (logit > 0)


def test_nonsaturating_objective_pushes_corrupt_logits_to_real():
    for logit in (-3.0, 0.5, 3.0):
        g = _logit_grad('nonsaturating', logit)
        assert g == pytest.approx(torch.sigmoid(torch.tensor(logit)).item() - 1.0, abs=1e-6)
        assert g < 0  # always towards "real"


def test_code_objective_values_and_cooperative_mask_term():
    torch.manual_seed(0)
    rl, cl = torch.randn(4), torch.randn(4)
    rm, cm = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2, requires_grad=True)
    mask = (torch.rand(4, 1, 2, 2) > 0.5).float()
    x, x_hat = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    total, parts = L.repair_objective(rl, cl, rm, cm, x_hat, x, mask, kind='code', adv_weight=0.5, rec_weight=30.0,
                                      coop_class_weight=1.0, coop_mask_weight=1.0)
    expect_coop = L.discriminator_class_loss(rl, cl) + L.mask_loss(rm, cm, mask)
    expect_adv = F.binary_cross_entropy_with_logits(torch.cat([rl, cl]), torch.cat([torch.zeros(4), torch.ones(4)]))
    assert parts['r_coop'].item() == pytest.approx(expect_coop.item(), rel=1e-6)
    assert parts['r_adv'].item() == pytest.approx(expect_adv.item(), rel=1e-6)
    assert total.item() == pytest.approx((expect_coop + 0.5 * expect_adv + 30 * L.kept_cells_l2_loss(x_hat, x, mask))
                                         .item(), rel=1e-6)
    total.backward()
    # the mask term is C's own mask loss: R is rewarded where C finds the dropped cells (gradient of BCE vs Omega)
    assert torch.allclose(cm.grad, (torch.sigmoid(cm) - mask).detach() / cm.numel() / 2, atol=1e-7)


def test_discriminator_objective_matches_its_parts():
    torch.manual_seed(1)
    rl, cl = torch.randn(3), torch.randn(3)
    rm, cm = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    mask = (torch.rand(3, 1, 2, 2) > 0.5).float()
    total, parts = L.discriminator_objective(rl, cl, rm, cm, mask, class_weight=1.0, mask_weight=0.1)
    assert total.item() == pytest.approx((L.discriminator_class_loss(rl, cl) + 0.1 * L.mask_loss(rm, cm, mask)).item())
    total0, parts0 = L.discriminator_objective(rl, cl, None, None, mask, mask_weight=0.0)
    assert parts0['c_mask'].item() == 0 and total0.item() == pytest.approx(parts['c_class'].item())


def test_binary_auc():
    s = torch.tensor([0.1, 0.4, 0.35, 0.8])
    y = torch.tensor([False, False, True, True])
    assert L.binary_auc(s, y).item() == pytest.approx(0.75)
    assert L.binary_auc(torch.zeros(6), torch.tensor([True, False] * 3)).item() == pytest.approx(0.5)  # ties
    assert L.binary_auc(torch.arange(4.), torch.tensor([False, False, True, True])).item() == 1.0
    assert L.binary_auc(torch.arange(4.), torch.zeros(4, dtype=torch.bool)).item() == 0.5  # one class absent


def test_fc6_as_matrix_product_equals_the_convolution():
    torch.manual_seed(0)
    m = timm.create_model('alexnet_spot_discriminator', head_kernel_size=4).eval()
    fc6 = m.pre_logits.fc6
    f = torch.randn(5, 256, 4, 4, requires_grad=True)
    ref = F.conv2d(f, fc6.weight, fc6.bias)
    out = m.pre_logits(f.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, F.relu(ref), atol=1e-5)
    g_ref, = torch.autograd.grad(F.relu(ref).sum(), fc6.weight)
    g_out, = torch.autograd.grad(m.pre_logits(f).sum(), fc6.weight)
    assert torch.allclose(g_ref, g_out, atol=1e-4)
    # channels-last weights (the trainer's default on CPUs with bf16) flatten in (h, w, c) order: same values
    m_cl = timm.create_model('alexnet_spot_discriminator', head_kernel_size=4).eval()
    m_cl.load_state_dict(m.state_dict())
    m_cl = m_cl.to(memory_format=torch.channels_last)
    assert not m_cl.pre_logits.fc6.weight.is_contiguous()
    assert torch.allclose(m_cl.pre_logits(f.contiguous(memory_format=torch.channels_last)), F.relu(ref), atol=1e-5)
    # a larger map (any input size) still takes the convolution path
    assert m.pre_logits(torch.randn(1, 256, 6, 6)).shape[-2:] == (3, 3)


def test_shared_encoder_gives_the_same_images():
    torch.manual_seed(0)
    gen = timm.create_model('damage_repair_generator', stem_width=8, widths=(8, 16, 32, 64)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = gen.sample_mask(2, (2, 2), 0.5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        phi = gen.encode(x)
        assert torch.equal(gen.decode(phi), gen.autoencode(x))
        assert torch.equal(RepairStep(gen)(phi, mask), gen.damage_and_repair(x, mask)[0])


def test_precision_and_thread_defaults(monkeypatch):
    cfg = C.resolve({}).run
    assert cfg.mixed_precision == 'auto' and cfg.channels_last == 'auto'
    monkeypatch.setattr(C, 'cpu_has_fast_bf16', lambda: True)
    assert C.resolve_precision(cfg, 'cpu') == ('bf16', True)
    monkeypatch.setattr(C, 'cpu_has_fast_bf16', lambda: False)
    assert C.resolve_precision(cfg, 'cpu') == ('no', False)
    assert C.resolve_precision(C.resolve({'mixed_precision': 'no', 'channels_last': True}).run, 'cpu') == ('no', True)
    assert C.resolve_precision(C.resolve({'mixed_precision': 'bf16', 'channels_last': False}).run, 'cpu') == \
        ('bf16', False)
    monkeypatch.setattr('os.getloadavg', lambda: (1.2, 0, 0))
    monkeypatch.setattr('os.sched_getaffinity', lambda pid: {0, 1})
    assert C.default_threads(1) == 1  # one of the two cores is busy
    monkeypatch.setattr('os.getloadavg', lambda: (0.1, 0, 0))
    assert C.default_threads(1) == 2 and C.default_threads(2) == 1
    with pytest.raises(C.ConfigError, match='channels_last'):
        C.resolve({'channels_last': 'yes'})
    with pytest.raises(C.ConfigError, match='generator_loss'):
        C.resolve({'generator_loss': 'minimax'})


@pytest.mark.slow
def test_stage2_snapshots_and_code_objective_run(tmp_path):
    from train_scripts.trainer import Pretrainer

    cfg = C.resolve(dict(C.load_yaml(str(REPO / 'train_scripts' / 'configs' / 'demo.yaml')), output_dir=str(tmp_path),
                         stage1_steps=2, stage2_steps=4, gen_stem_width=8, gen_widths=[8, 16, 32, 64], threads=1,
                         progress=False, generator_loss='code', mask_loss_weight=1.0, snapshots=[0, 0.5, 1.0],
                         figure_every=0, checkpoint_every=0, log_every=2, mixed_precision='no'))
    Pretrainer(cfg).run()
    snaps = sorted(p.name for p in (tmp_path / 'snapshots').iterdir())
    assert snaps == [f'alexnet_spot_stage2_step{s:07d}.safetensors' for s in (0, 2, 4)]
    recs = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    last = [r for r in recs if r['stage'] == 2][-1]
    for key in ('r_coop', 'mask_auc', 'logit_real', 'logit_corrupt', 'corrupt_l1_dropped'):
        assert key in last
    from safetensors.torch import load_file
    final = load_file(str(tmp_path / 'alexnet_spot.safetensors'))
    last_snap = load_file(str(tmp_path / 'snapshots' / snaps[-1]))
    assert all(torch.equal(final[k], last_snap[k]) for k in final)

"""The fine-tuning benchmark's protocol (benchmarks/finetune_c10.py) and the frozen-trunk switch it relies on."""
import importlib.util
import os
import sys

import numpy as np
import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

import timm_spot  # noqa: F401

_PATH = os.path.join(os.path.dirname(__file__), '..', 'benchmarks', 'finetune_c10.py')
_spec = importlib.util.spec_from_file_location('finetune_c10', _PATH)
ft = importlib.util.module_from_spec(_spec)
sys.modules['finetune_c10'] = ft  # dataclasses look their module up
_spec.loader.exec_module(ft)


def _labels(per_class=600, classes=10):
    # interleaved like a shuffled data set, so "the last rows of a class" is not a contiguous block
    return np.tile(np.arange(classes), per_class)


def test_splits_keep_heldout_rows_out_of_every_training_and_validation_set():
    labels = _labels()
    s = ft.split_rows(labels, seeds=[0, 1])
    test, val = set(s['test'].tolist()), set(s['val'].tolist())
    assert len(test) == 10 * ft.HELD_OUT_PER_CLASS and len(val) == 10 * ft.VAL_PER_CLASS
    assert not test & val
    # the held-out rows are the last 500 of each class (the rows pretraining never saw)
    for c in range(10):
        rows = np.flatnonzero(labels == c)
        assert set(rows[-ft.HELD_OUT_PER_CLASS:].tolist()) <= test
    for seed, orders in s['orders'].items():
        for fraction in ft.FRACTIONS:
            rows = set(np.concatenate(list(ft.fraction_rows(orders, fraction).values())).tolist())
            assert not rows & test and not rows & val
            for c, r in ft.fraction_rows(orders, fraction).items():
                assert (labels[r] == c).all()


def test_fractions_are_nested_per_seed_and_differ_between_seeds():
    s = ft.split_rows(_labels(), seeds=[0, 1])
    small0 = ft.fraction_rows(s['orders'][0], '1%')
    big0 = ft.fraction_rows(s['orders'][0], '10%')
    small1 = ft.fraction_rows(s['orders'][1], '1%')
    for c in small0:
        assert len(small0[c]) == 45 and len(big0[c]) == 50  # 10 % of this toy pool is all 50 rows left per class
        assert set(small0[c].tolist()) <= set(big0[c].tolist())
        assert set(small0[c].tolist()) != set(small1[c].tolist())
    again = ft.split_rows(_labels(), seeds=[0, 1])
    assert all((again['orders'][0][c] == s['orders'][0][c]).all() for c in small0)


def _row(init, lr, val, held, seed=0, fraction='1%', variant='finetune'):
    job = ft.Job(init, variant, fraction, seed, lr)
    return {'init': init, 'variant': variant, 'fraction': fraction, 'seed': seed, 'lr': lr, 'key': job.key,
            'val_top1': val, 'heldout_top1': held}


def test_learning_rate_is_chosen_on_validation_never_on_heldout_rows():
    rows = [_row('random', 1e-4, 30.0, 60.0), _row('random', 3e-4, 40.0, 20.0), _row('random', 1e-3, 40.0, 10.0)]
    # best V (a tie between 3e-4 and 1e-3 goes to the smaller rate), whatever the held-out rows say
    assert ft.chosen_lr(rows, 'random', 'finetune', '1%') == 3e-4
    with pytest.raises(RuntimeError, match='incomplete'):
        ft.chosen_lr(rows[:2], 'random', 'finetune', '1%')
    # 100 % reuses the 10 % choice
    rows10 = [_row('random', lr, v, 0.0, fraction='10%') for lr, v in ((1e-4, 50.0), (3e-4, 45.0), (1e-3, 1.0))]
    assert ft.chosen_lr(rows10, 'random', 'finetune', '100%') == 1e-4


def test_seed_jobs_reuse_the_chosen_rate_and_skip_seed_zero_of_the_grid():
    rows = [_row(i, lr, v, 0.0, fraction=f) for i in ('random', 'v2') for f in ('1%', '10%')
            for lr, v in zip(ft.LR_GRID['finetune'], (10.0, 30.0, 20.0))]
    jobs = ft.seed_jobs(rows, ['random', 'v2'], ['finetune'], [0, 1, 2], list(ft.FRACTIONS))
    assert {j.lr for j in jobs} == {3e-4}
    assert sorted((j.fraction, j.seed) for j in jobs if j.init == 'v2') == sorted([
        ('100%', 0), ('10%', 1), ('10%', 2), ('1%', 1), ('1%', 2)])


def test_the_frozen_variant_chooses_its_rate_at_every_fraction_finetuning_reuses_10_percent():
    frozen = {(j.fraction, j.lr) for j in ft.grid_jobs(['random'], ['frozen'])}
    assert frozen == {(f, lr) for f in ft.FRACTIONS for lr in ft.LR_GRID['frozen']}
    assert {j.fraction for j in ft.grid_jobs(['random'], ['finetune'])} == {'1%', '10%'}
    rows = [_row('random', lr, v, 0.0, fraction=f, variant='frozen') for f in ft.FRACTIONS
            for lr, v in zip(ft.LR_GRID['frozen'], (5.0, 1, 1, 1, 1) if f == '100%' else (1.0, 1, 1, 1, 5))]
    assert ft.chosen_lr(rows, 'random', 'frozen', '100%') == ft.LR_GRID['frozen'][0]
    assert ft.chosen_lr(rows, 'random', 'frozen', '10%') == ft.LR_GRID['frozen'][-1]
    jobs = ft.seed_jobs(rows, ['random'], ['frozen'], [0, 1], list(ft.FRACTIONS))
    assert sorted((j.fraction, j.seed) for j in jobs) == sorted([('10%', 1), ('1%', 1)])


def test_summary_gains_are_paired_by_seed():
    rows = []
    for init, base in (('random', 30.0), ('v2', 33.0)):
        for lr, v in zip(ft.LR_GRID['finetune'], (1.0, 2.0, 3.0)):
            rows.append(_row(init, lr, v, base if lr == 1e-3 else 0.0))
        rows += [_row(init, 1e-3, 0.0, base + 1.0 + (init == 'v2'), seed=1),
                 _row(init, 1e-3, 0.0, base - 1.0, seed=2)]
    cell = ft.summarise(rows, ['random', 'v2'], ['finetune'])['finetune']['1%']
    assert cell['random']['mean'] == pytest.approx(30.0) and cell['random']['seeds'] == 3
    assert cell['v2']['gain_vs_random']['mean'] == pytest.approx(3 + 1 / 3)
    assert cell['v2']['gain_vs_random']['sd'] == pytest.approx(np.std([3.0, 4.0, 3.0], ddof=1))


def test_frozen_trunk_trains_only_the_head_through_timms_optimizer():
    torch.manual_seed(0)
    model = timm.create_model('alexnet_spot', num_classes=10, freeze_trunk=True)
    trunk = {k: v.clone() for k, v in model.features.state_dict().items()}
    head = model.head.fc.weight.detach().clone()
    opt = create_optimizer_v2(model, 'adamw', lr=1e-2, weight_decay=0.05)
    assert sum(p.numel() for g in opt.param_groups for p in g['params']) == 256 * 10 + 10
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(torch.equal(trunk[k], v) for k, v in model.features.state_dict().items())
    assert not torch.equal(head, model.head.fc.weight)
    # the default trains everything
    assert all(p.requires_grad for p in timm.create_model('alexnet_spot', num_classes=10).parameters())


def _toy_parquet(path, classes=3, per_class=24):
    import io

    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images, labels = [], []
    for r in range(classes * per_class):
        c = r % classes
        pixels = np.full((8, 8, 3), 40 + 80 * c, np.uint8) + rng.integers(0, 30, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format='PNG')
        images.append({'bytes': buf.getvalue(), 'path': None})
        labels.append(c)
    feats = datasets.Features({'image': datasets.Image(),
                               'label': datasets.ClassLabel(names=[f'c{i}' for i in range(classes)])})
    datasets.Dataset.from_dict({'image': images, 'label': labels}, features=feats).to_parquet(str(path))


@pytest.mark.slow
def test_benchmark_runs_timms_train_and_validate_end_to_end(tmp_path, monkeypatch):
    """The whole protocol on a toy set with timm's real scripts: grid, chosen rate, seeds, held-out scores."""
    from test_cli_timm_scripts import NO_SCRIPTS, SCRIPTS

    if SCRIPTS is None:
        pytest.skip(NO_SCRIPTS)
    monkeypatch.setattr(ft, 'HELD_OUT_PER_CLASS', 4)
    monkeypatch.setattr(ft, 'VAL_PER_CLASS', 4)
    monkeypatch.setattr(ft, 'FRACTIONS', {'1%': 4, '10%': 8, '100%': None})
    monkeypatch.setattr(ft, 'SCHEDULE', {'1%': 1, '10%': 1, '100%': 1})
    monkeypatch.setattr(ft, 'LR_GRID', {'finetune': (1e-4, 1e-3), 'frozen': (1e-3, 1e-2)})
    monkeypatch.setattr(ft, 'BATCH_SIZE', 4)
    _toy_parquet(tmp_path / 'toy.parquet')
    weights = tmp_path / 'backbone.safetensors'
    from safetensors.torch import save_file
    save_file(timm.create_model('alexnet_spot').state_dict(), str(weights))
    out = tmp_path / 'summary.json'
    args = ['--data', str(tmp_path / 'toy.parquet'), '--root', str(tmp_path / 'work'), '--init', f'init2={weights}',
            '--variants', 'frozen', '--seeds', '0', '1', '--jobs', '2', '--scripts', os.path.dirname(SCRIPTS[0]),
            '--out', str(out)]
    assert ft.main(args) == 0
    import json
    summary = json.load(open(out))
    runs = summary['runs']
    # the frozen variant's grid: 3 fractions x 2 rates; then seed 1 at 1 % and 10 % (100 %: seed 0 only)
    assert len(runs) == 6 + 2
    for r in runs:
        assert 0.0 <= r['heldout_top1'] <= 100.0 and 0.0 <= r['val_top1'] <= 100.0
    cell = summary['table']['frozen']['1%']
    assert set(cell) == {'init2'} and cell['init2']['seeds'] == 2
    assert cell['init2']['lr'] == ft.chosen_lr(runs, 'init2', 'frozen', '1%')
    best_100 = max((r for r in runs if r['fraction'] == '100%'), key=lambda r: (r['val_top1'], -r['lr']))
    assert summary['table']['frozen']['100%']['init2']['lr'] == best_100['lr']
    # a second call finds every job done and runs nothing
    before = len(open(tmp_path / 'work' / 'results.jsonl').readlines())
    ft.main(args)
    assert len(open(tmp_path / 'work' / 'results.jsonl').readlines()) == before


def _summary_for_card():
    rows = []
    for init, base in (('random', 30.0), ('v2', 36.0)):
        for lr, v in zip(ft.LR_GRID['finetune'], (1.0, 2.0, 3.0)):
            rows.append(_row(init, lr, v, base if lr == 1e-3 else 0.0))
        rows += [_row(init, 1e-3, 0.0, base + 1.0, seed=1), _row(init, 1e-3, 0.0, base - 1.0, seed=2)]
    return {'inits': {'random': None, 'v2': 'x/model.safetensors'}, 'command': 'python benchmarks/finetune_c10.py',
            'protocol': {'fractions_per_class': ft.FRACTIONS, 'held_out_per_class': 500, 'val_per_class': 50,
                         'batch_size': 64, 'epochs': ft.SCHEDULE, 'device': 'cpu', 'lr_grid': ft.LR_GRID},
            'table': ft.summarise(rows, ['random', 'v2'], ['finetune'])}


def test_hub_card_shows_the_benchmark_with_a_plain_verdict():
    import importlib

    from hub.card import _finetuning_section, finetuning_results

    table_mod = importlib.util.spec_from_file_location(
        'finetune_c10_table', os.path.join(os.path.dirname(_PATH), 'finetune_c10_table.py'))
    tab = importlib.util.module_from_spec(table_mod)
    table_mod.loader.exec_module(tab)
    entry = tab.hub_entry(_summary_for_card(), 'v2', 'python benchmarks/finetune_c10.py --init random v2=W')
    assert entry['summary'].startswith('Against random initialisation, v2 helps at 1% (finetune: +6.0 ± 0.0)')
    assert finetuning_results({'alexnet_spot': {'finetuning': entry}}, 'alexnet_spot') is entry
    assert finetuning_results({'alexnet_spot': {'evaluations': []}}, 'alexnet_spot') is None
    text = '\n'.join(_finetuning_section(entry))
    assert '| v2 (these weights) | 36.0 ± 1.0 (n=3) [+6.0 ± 0.0] |' in text
    assert '| random | 30.0 ± 1.0 (n=3) |' in text
    with pytest.raises(ValueError, match='lacks'):
        finetuning_results({'alexnet_spot': {'finetuning': {'table': {}}}}, 'alexnet_spot')
    # a gain inside the seeds' spread is not called help
    summary = _summary_for_card()
    cell = summary['table']['finetune']['1%']['v2']
    cell['gain_vs_random'] = {'mean': 0.5, 'sd': 1.5}
    assert 'does not clearly help at 1% (finetune: +0.5 ± 1.5)' in tab.verdict(summary, 'v2')

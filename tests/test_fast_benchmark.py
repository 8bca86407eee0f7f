"""The prepared GPU script (benchmarks/gpu/stage2_speed.py) in its CPU smoke mode: it times today's and the fast
steps in one process, trains a few steps of both stages and writes the JSON, metrics and weights it promises."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_stage2_speed_smoke_writes_its_report(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu' / 'stage2_speed.py'), '--smoke', '--out',
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / 'stage2_speed.json').read_text())
    assert report['device'] == 'cpu'
    assert {(s['stage'], s['px']) for s in report['summary']} == {(1, 32), (2, 32)}
    for s in report['summary']:
        for key in ('baseline_img_per_s', 'new_img_per_s', 'ratio', 'device', 'peak_mem', 'fraction_of_peak'):
            assert key in s
        assert s['ratio'] == pytest.approx(s['new_img_per_s'] / s['baseline_img_per_s'])
        assert 0 < s['fraction_of_peak'] < 1
    assert {r['variant'] for r in report['results']} == {'reference', 'fast'}
    assert [(t['stage'], t['steps']) for t in report['training']] == [(1, 3), (2, 3)]
    assert (tmp_path / 'damage_repair_generator_stage2.safetensors').is_file()
    assert sorted(p.name for p in (tmp_path / 'snapshots').iterdir())[-1] == 'discriminator_step0000003.safetensors'
    records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert {r['stage'] for r in records} == {1, 2} and all('img_per_s' in r for r in records)
    assert any('c_total' in r and 'acc_real' in r for r in records if r['stage'] == 2)

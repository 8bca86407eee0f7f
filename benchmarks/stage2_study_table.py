#!/usr/bin/env python
"""One table for the stage-2 objective study: probe top-1 per layer (from ``probe_cifar10.py --json``) beside the
pretext metrics and shortcut AUCs at the end of each run (its ``metrics.jsonl``, or a ``shortcut_check.py --json``
file for runs made before the monitor existed).

    python benchmarks/stage2_study_table.py --probes probes.json --runs NAME=RUN_DIR ... [--shortcut NAME=JSON ...] \\
        [--json OUT]

Rows are matched by name: the probe row labels (``probe_cifar10.py --labels``) and the NAME of each run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

LAYERS = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5')
PRETEXT = ('acc_real', 'acc_corrupt', 'mask_auc')
SHORTCUT = ('c_image_auc', 'shortcut_image_auc', 'c_cell_auc', 'shortcut_cell_auc', 'dropped_brightness_shift')


def last_record(run_dir: str, keys) -> dict:
    """The last stage-2 values of ``keys`` in a run's metrics.jsonl (a run directory or the file itself; each key
    from the last record holding it)."""
    out: dict = {}
    path = run_dir if os.path.isfile(run_dir) else os.path.join(run_dir, 'metrics.jsonl')
    with open(path, encoding='utf-8') as f:
        for line in f:
            rec = json.loads(line)
            if rec.get('stage') == 2:
                out.update({k: rec[k] for k in keys if k in rec})
    return out


COLORS = [(200, 30, 30), (30, 90, 200), (0, 150, 0), (230, 140, 0), (140, 50, 160), (0, 160, 160), (120, 120, 120),
          (0, 0, 0), (180, 120, 60), (255, 0, 150), (100, 200, 0)]


def draw(rows: dict, path: str) -> None:
    """Left: probe top-1 per layer, one line per recipe. Right: each recipe's C AUC against the cell-statistics
    shortcut's AUC (real vs repaired images): the method wants points above the diagonal, far from 0.5 on C's
    axis. PIL only (no plotting library is a dependency)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    w, h, m = 420, 300, 50
    img = Image.new('RGB', (2 * w + 3 * m + 170, h + 2 * m + 20), 'white')
    d = ImageDraw.Draw(img)
    d.text((m, 8), 'Stage-2 objective study. Left: CIFAR-10 probe top-1 % per layer (held-out 5,000). '
                   'Right: C\'s AUC vs the cell-statistics shortcut\'s AUC, real vs repaired (dashed: equal).',
           fill='black', font=font)
    vals = [r['probe'][k][0] for r in rows.values() for k in LAYERS if k in r.get('probe', {})]
    lo, hi = (int(min(vals)) - 1, int(max(vals)) + 2) if vals else (0, 100)
    x0, y0 = m, m
    d.rectangle([x0, y0, x0 + w, y0 + h], outline='black')
    X = lambda i: x0 + 20 + i * (w - 40) / (len(LAYERS) - 1)  # noqa: E731
    Y = lambda v: y0 + h - (v - lo) / (hi - lo) * h  # noqa: E731
    for t in range(lo, hi + 1):
        d.line([x0, Y(t), x0 + 4, Y(t)], fill='black')
        d.text((x0 - 22, Y(t) - 6), str(t), fill='black', font=font)
    for i, k in enumerate(LAYERS):
        d.text((X(i) - 12, y0 + h + 6), k, fill='black', font=font)
    x1 = x0 + w + m + 20
    d.rectangle([x1, y0, x1 + h, y0 + h], outline='black')
    S = lambda a, b: (x1 + (a - 0.5) / 0.5 * h, y0 + h - (b - 0.5) / 0.5 * h)  # noqa: E731
    for t in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        d.text((S(t, 0.5)[0] - 8, y0 + h + 6), f'{t:.1f}', fill='black', font=font)
        d.text((x1 - 22, S(0.5, t)[1] - 6), f'{t:.1f}', fill='black', font=font)
    for j in range(0, h, 8):
        d.line([x1 + j, y0 + h - j, x1 + j + 4, y0 + h - j - 4], fill=(150, 150, 150))
    d.text((x1 + 40, y0 + h + 20), 'shortcut AUC (cell statistics)', fill='black', font=font)
    d.text((x1 + 6, y0 + 4), "C's AUC (same images)", fill='black', font=font)
    for n, (name, r) in enumerate(rows.items()):
        color = COLORS[n % len(COLORS)]
        probe = r.get('probe', {})
        pts = [(X(i), Y(probe[k][0])) for i, k in enumerate(LAYERS) if k in probe]
        if len(pts) > 1:
            d.line(pts, fill=color, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
        if 'c_image_auc' in r and 'shortcut_image_auc' in r:
            p = S(min(max(r['shortcut_image_auc'], 0.5), 1.0), min(max(r['c_image_auc'], 0.5), 1.0))
            d.ellipse([p[0] - 4, p[1] - 4, p[0] + 4, p[1] + 4], fill=color)
        d.text((x1 + h + 15, y0 + 12 * n), name, fill=color, font=font)
    img.save(path)


def pairs(items):
    out = {}
    for item in items or []:
        name, _, value = item.partition('=')
        if not value:
            raise SystemExit(f'expected NAME=VALUE, got {item!r}')
        out[name] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--probes', nargs='+', required=True, help='probe_cifar10.py --json files')
    p.add_argument('--runs', nargs='*', default=[], metavar='NAME=RUN_DIR_OR_METRICS_JSONL')
    p.add_argument('--shortcut', nargs='*', default=[], metavar='NAME=JSON')
    p.add_argument('--json', default=None)
    p.add_argument('--figure', default=None, help='PNG: probes per layer, and C against the shortcut')
    args = p.parse_args(argv)
    rows, commands = {}, []
    for path in args.probes:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
        commands.append(data.get('command'))
        for name, row in data['rows'].items():
            rows[name] = {'probe': {k: (row[k]['top1'], row[k].get('top1_sd', 0.0), row[k].get('weight_decay'))
                                    for k in LAYERS if k in row}}
    for name, run in pairs(args.runs).items():
        rows.setdefault(name, {}).update(last_record(run, PRETEXT + SHORTCUT))
    for name, path in pairs(args.shortcut).items():
        with open(path, encoding='utf-8') as f:
            rows.setdefault(name, {}).update({k: v for k, v in json.load(f).items() if k in SHORTCUT})
    head = '| recipe | ' + ' | '.join(LAYERS) + ' | C acc real / corrupt | C image AUC / shortcut | ' \
           'C cell AUC / shortcut |'
    print(head)
    print('|' + '---|' * (head.count('|') - 1))
    for name, r in rows.items():
        probe = r.get('probe', {})
        cells = [(f'{probe[k][0]:.1f}' + (f' +- {probe[k][1]:.1f}' if probe[k][1] else '')) if k in probe else ''
                 for k in LAYERS]  # +- : SD over probe seeds, where more than one was run
        fmt = lambda k: f'{r[k]:.2f}' if k in r else '-'  # noqa: E731
        print(f'| {name} | ' + ' | '.join(cells) + f' | {fmt("acc_real")} / {fmt("acc_corrupt")} | '
              f'{fmt("c_image_auc")} / {fmt("shortcut_image_auc")} | {fmt("c_cell_auc")} / '
              f'{fmt("shortcut_cell_auc")} |')
    if args.figure:
        draw(rows, args.figure)
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump({'probe_commands': commands, 'command': ' '.join(['python'] + sys.argv), 'rows': rows}, f,
                      indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())

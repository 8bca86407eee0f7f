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
    """The last stage-2 values of ``keys`` in a run's metrics.jsonl (each key from the last record holding it)."""
    out: dict = {}
    with open(os.path.join(run_dir, 'metrics.jsonl'), encoding='utf-8') as f:
        for line in f:
            rec = json.loads(line)
            if rec.get('stage') == 2:
                out.update({k: rec[k] for k in keys if k in rec})
    return out


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
    p.add_argument('--runs', nargs='*', default=[], metavar='NAME=RUN_DIR')
    p.add_argument('--shortcut', nargs='*', default=[], metavar='NAME=JSON')
    p.add_argument('--json', default=None)
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
        cells = [f'{probe[k][0]:.1f} +- {probe[k][1]:.1f}' if k in probe else '' for k in LAYERS]
        fmt = lambda k: f'{r[k]:.2f}' if k in r else '-'  # noqa: E731
        print(f'| {name} | ' + ' | '.join(cells) + f' | {fmt("acc_real")} / {fmt("acc_corrupt")} | '
              f'{fmt("c_image_auc")} / {fmt("shortcut_image_auc")} | {fmt("c_cell_auc")} / '
              f'{fmt("shortcut_cell_auc")} |')
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump({'probe_commands': commands, 'command': ' '.join(['python'] + sys.argv), 'rows': rows}, f,
                      indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())

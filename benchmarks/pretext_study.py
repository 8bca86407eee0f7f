#!/usr/bin/env python
"""Small-budget study of stage 2: which changes make the pretext task learnable?

Every variant runs stage 2 of ``train_scripts/pretrain.py`` for the same short budget from one fixed stage-1
autoencoder, with the same seed, changing one thing (a few ``--set`` overrides). Per variant the table reports, over
the last 20 % of the logged steps: C's accuracy on real and corrupt images, the mask head's AUC and recall of dropped
cells, C's mean logits, how far corrupt images are from the real ones on dropped pixels, and (``--probe``) a quick
linear probe of the backbone (conv1..conv5 top-1 on held-out CIFAR-10 images).

    # the stage-1 autoencoder the variants share (once)
    python benchmarks/pretext_study.py --config train_scripts/configs/study_c10_64.yaml --out runs/study \\
        --make-ae ae=1500
    # the variants (names from VARIANTS below), 4 at a time, then probes
    python benchmarks/pretext_study.py --config train_scripts/configs/study_c10_64.yaml --out runs/study \\
        --steps 600 --parallel 4 --probe --variants paper code adv05 mask1 theta05 no_history

Results: ``<out>/study.json`` and ``<out>/study.md`` (the table; benchmarks/README.md keeps the measured ones).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

# name -> (overrides, what it tests). 'paper' is the recipe as the paper states it (the old default).
VARIANTS: Dict[str, tuple] = {
    'paper': ({}, "paper recipe: non-saturating R loss, theta 0.7, mask weight 0.1, history on"),
    'code': ({'generator_loss': 'code'}, "R's objective as the authors' code computes it (C's losses + swapped CE)"),
    'adv05': ({'adv_loss_weight': 0.5}, "non-saturating, adversarial weight 0.5 (the code's relative weight)"),
    'code_adv05': ({'generator_loss': 'code', 'adv_loss_weight': 0.5}, 'code objective, swapped-CE weight 0.5'),
    'mask1': ({'mask_loss_weight': 1.0}, 'mask loss weight 1 instead of 0.1'),
    'code_mask1': ({'generator_loss': 'code', 'mask_loss_weight': 1.0}, 'code objective and mask weight 1'),
    'theta05': ({'theta': 0.5}, 'drop rate 0.5'),
    'no_history': ({'history': False}, 'no history buffer (ablation (j))'),
    'r_lr_01': ({'r_lr_factor': 0.1}, "R's learning rate 0.1x C's"),
    'no_repair': ({'repair': 'none'}, 'no repair network (ablation (k)): the task without an adversary'),
    'theta01': ({'theta': 0.1}, 'drop rate 0.1 (Table 1 (c))'),
    # numerics of the fast default (issue: bf16 must track float32 from the same seed)
    'fp32': ({'mixed_precision': 'no', 'channels_last': False}, 'float32, NCHW (the reference numerics)'),
    'bf16': ({'mixed_precision': 'bf16', 'channels_last': True}, 'bf16 autocast + channels-last (the CPU default '
                                                                 'where AVX512-BF16/AMX exist)'),
}

SUMMARY_KEYS = ('acc_real', 'acc_corrupt', 'mask_auc', 'mask_recall_dropped', 'mask_acc', 'c_class', 'logit_real',
                'logit_corrupt', 'corrupt_l1_dropped', 'r_adv', 'r_rec', 'img_per_s')


def pretrain_cmd(config: str, out_dir: str, sets: Dict[str, object]) -> List[str]:
    cmd = [sys.executable, os.path.join(REPO, 'train_scripts', 'pretrain.py'), '--config', config]
    for k, v in sets.items():
        cmd += ['--set', f'{k}={json.dumps(v) if not isinstance(v, str) else v}']
    cmd += ['--set', f'output_dir={out_dir}', '--set', 'overwrite=true', '--set', 'progress=false']
    return cmd


def run_all(jobs: List[tuple], parallel: int) -> Dict[str, int]:
    """Run (name, cmd, log) jobs, ``parallel`` at a time; returns exit codes."""
    pending, running, codes = list(jobs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd, log = pending.pop(0)
            os.makedirs(os.path.dirname(log), exist_ok=True)
            f = open(log, 'w')
            f.write('$ ' + ' '.join(shlex.quote(c) for c in cmd) + '\n')
            f.flush()
            running.append((name, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO), f, time.time()))
        time.sleep(2)
        for item in list(running):
            name, proc, f, t0 = item
            if proc.poll() is not None:
                f.close()
                codes[name] = proc.returncode
                print(f'  {name}: exit {proc.returncode} after {time.time() - t0:.0f}s', flush=True)
                running.remove(item)
    return codes


def summarize(metrics_path: str, tail: float = 0.2) -> Dict[str, object]:
    recs = [json.loads(line) for line in open(metrics_path) if line.strip()]
    recs = [r for r in recs if r.get('stage') == 2]
    if not recs:
        return {}
    n = max(1, int(round(len(recs) * tail)))
    last = recs[-n:]
    out: Dict[str, object] = {'steps': recs[-1]['step']}
    for k in SUMMARY_KEYS:
        vals = [r[k] for r in last if r.get(k) is not None]
        if vals:
            out[k] = sum(vals) / len(vals)
    # the trajectory: mean of each quarter of the run (does it keep rising?)
    q = max(1, len(recs) // 4)
    out['trajectory'] = {k: [round(statistics.fmean(r[k] for r in recs[i * q:(i + 1) * q]), 3) for i in range(4)]
                         for k in ('acc_corrupt', 'acc_real', 'mask_auc', 'c_class') if all(k in r for r in recs)}
    return out


def write_results(args, argv, results, wall, quiet=False) -> None:
    command = 'python ' + ' '.join(shlex.quote(a) for a in [os.path.relpath(__file__, os.getcwd())] +
                                   (sys.argv[1:] if argv is None else list(argv)))
    with open(os.path.join(args.out, 'study.json'), 'w') as f:
        json.dump({'command': command, 'steps': args.steps, 'wall_s': round(wall), 'results': results}, f, indent=1)
    lines = [f'`{command}`', '',
             '| variant | acc real | acc corrupt | mask AUC | dropped recall | C class loss | logit real / corrupt '
             '| corrupt L1 (dropped) | probe conv1..conv5 | what |', '|' + '---|' * 10]
    for name, r in results.items():
        def g(k, fmt='{:.3f}'):
            return fmt.format(r[k]) if k in r else '-'
        probe = ' / '.join(f'{v:.1f}' for v in r['probe'].values()) if 'probe' in r else '-'
        lines.append(f"| {name} | {g('acc_real')} | {g('acc_corrupt')} | {g('mask_auc')} | "
                     f"{g('mask_recall_dropped')} | {g('c_class')} | {g('logit_real', '{:.2f}')} / "
                     f"{g('logit_corrupt', '{:.2f}')} | {g('corrupt_l1_dropped')} | {probe} | {r.get('what', '')} |")
    with open(os.path.join(args.out, 'study.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    if not quiet:
        print('\n'.join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--config', required=True, help='base pretraining config (data, size, batch, ...)')
    p.add_argument('--out', required=True, help='study directory (one run dir per variant)')
    p.add_argument('--make-ae', nargs='*', default=[], metavar='NAME=STEPS',
                   help='train stage-1 autoencoders first: <out>/<NAME> with STEPS steps')
    p.add_argument('--ae', default='ae', help='the autoencoder (a --make-ae NAME or a run dir) the variants start from')
    p.add_argument('--variants', nargs='*', default=[], help=f'variants to run, from: {", ".join(VARIANTS)}; '
                                                              'or NAME:key=value,key=value for ad-hoc ones')
    p.add_argument('--steps', type=int, default=600, help='stage-2 steps per variant')
    p.add_argument('--parallel', type=int, default=1, help='variants run at once (GPU: several fit)')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='extra override for every run')
    p.add_argument('--probe', action='store_true', help='linear-probe each variant\'s backbone (and random init)')
    p.add_argument('--probe-data', default=None, help='labelled parquet for the probe (default: the config\'s data)')
    p.add_argument('--probe-train-per-class', type=int, default=500)
    p.add_argument('--probe-epochs', type=int, default=20)
    p.add_argument('--device', default=None, help="probe device (default: cuda if available, else cpu)")
    args = p.parse_args(argv)

    from train_scripts import config as config_lib

    base = config_lib.load_yaml(args.config)
    extra = config_lib.parse_overrides(args.set)
    os.makedirs(args.out, exist_ok=True)

    jobs = []
    for item in args.make_ae:
        name, steps = item.split('=')
        sets = {**extra, 'stage': '1', 'stage1_steps': int(steps)}
        jobs.append((name, pretrain_cmd(args.config, os.path.join(args.out, name), sets),
                     os.path.join(args.out, 'logs', f'{name}.log')))
    if jobs:
        print(f'stage 1: {len(jobs)} autoencoder(s)', flush=True)
        codes = run_all(jobs, args.parallel)
        if any(codes.values()):
            print(f'stage-1 runs failed: {codes} (see {args.out}/logs)', file=sys.stderr)
            return 1

    ae = args.ae if os.path.isdir(args.ae) else os.path.join(args.out, args.ae)
    init = os.path.join(ae, 'damage_repair_generator_stage1.safetensors')
    jobs, described = [], {}
    for v in args.variants:
        if ':' in v:
            name, spec = v.split(':', 1)
            overrides = config_lib.parse_overrides(spec.split(','))
            described[name] = (overrides, 'ad hoc: ' + spec)
        else:
            if v not in VARIANTS:
                print(f'unknown variant {v!r}; known: {", ".join(VARIANTS)}', file=sys.stderr)
                return 2
            name, overrides = v, VARIANTS[v][0]
            described[name] = VARIANTS[v]
        sets = {**extra, 'stage': '2', 'init_generator': init, 'stage2_steps': args.steps, **overrides}
        jobs.append((name, pretrain_cmd(args.config, os.path.join(args.out, name), sets),
                     os.path.join(args.out, 'logs', f'{name}.log')))
    if not jobs:
        return 0
    if not os.path.isfile(init):
        print(f'no stage-1 generator at {init}: run --make-ae first or pass --ae', file=sys.stderr)
        return 2
    print(f'stage 2: {len(jobs)} variant(s), {args.steps} steps each, {args.parallel} at a time', flush=True)
    t0 = time.time()
    codes = run_all(jobs, args.parallel)
    wall = time.time() - t0

    results = {}
    for name, (overrides, what) in described.items():
        metrics = os.path.join(args.out, name, 'metrics.jsonl')
        res = {'overrides': overrides, 'what': what, 'exit': codes.get(name)}
        if os.path.isfile(metrics):
            res.update(summarize(metrics))
        results[name] = res
    write_results(args, argv, results, wall, quiet=True)

    if args.probe:
        import torch

        from timm_spot.eval.probe import ProbeConfig
        from timm_spot.eval.protocols import layerwise_probe

        device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
        data = args.probe_data or base.get('data')
        cfg = ProbeConfig(epochs=args.probe_epochs)
        size = int(base.get('img_size', 64))
        probes = {'random init': None}
        probes.update({n: os.path.join(args.out, n, 'alexnet_spot.safetensors') for n in described})
        for name, w in probes.items():
            if w is not None and not os.path.isfile(w):
                continue
            r = layerwise_probe(weights=w, source=data, train_per_class=args.probe_train_per_class, val_per_class=500,
                                img_size=size, crop_pct=1.0, probe=cfg, cache_dir=None, device=device, log=None)
            top1 = {k: round(v['top1'], 1) for k, v in r.items() if not k.startswith('_')}
            results.setdefault(name, {})['probe'] = top1
            print(f'  probe {name}: {top1}', flush=True)
            write_results(args, argv, results, wall, quiet=True)
    write_results(args, argv, results, wall)

    return 0 if not any(codes.values()) else 1


if __name__ == '__main__':
    sys.exit(main())

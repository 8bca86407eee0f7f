#!/usr/bin/env python
"""Layerwise linear probes of ``alexnet_spot`` on CIFAR-10 (paper Table 4 shape: rows = models, cols = conv1..5).

Data: ``$TIMM_SPOT_DATA/cifar10/train.parquet`` (default ``TIMM_SPOT_DATA=<repo>/../shared/data``; 50,000 images,
32x32). The last ``--val-per-class`` images of each
class (default 500, 5,000 in all) are the validation part and are never trained on; the probes train on the first
``--train-per-class`` images of each class among the rest (default 1,000, 10,000 in all). Images are upsampled to
``--img-size`` (default 64 px: conv5 is a 4x4 grid there), normalised as alexnet_spot's pretrained cfg says, passed
through the frozen backbone once (features cached), every conv tap average-pooled to about 9,200 dims (capped at the
map size: conv1 10x10, conv2 6x6, conv3-5 4x4 at 64 px), then one linear classifier per layer (Adam, weight decay,
standardised features, all layers trained together).

    python benchmarks/probe_cifar10.py                          # random init only
    python benchmarks/probe_cifar10.py --weights alexnet_spot.safetensors [more.safetensors ...]

Rows: ``alexnet_spot (random init)`` plus one per ``--weights`` file (backbone or discriminator checkpoints).
Runs in a few minutes on 2 CPU cores with the defaults (feature extraction dominates the first run; later runs read
the cache).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

DATA_ROOT = os.environ.get('TIMM_SPOT_DATA') or os.path.join(REPO, '..', 'shared', 'data')
DEFAULT_DATA = os.path.join(DATA_ROOT, 'cifar10', 'train.parquet')

# paper Table 4 (ImageNet, 1000 classes, 224 px): for the table's shape only, not comparable to CIFAR-10 numbers
PAPER_TABLE4 = {
    'paper ImageNet: Krizhevsky et al. (supervised)': (19.3, 36.3, 44.2, 48.3, 50.5),
    'paper ImageNet: Random': (11.6, 17.1, 16.9, 16.3, 14.1),
    'paper ImageNet: Ours (Jenni & Favaro)': (19.5, 33.3, 37.9, 38.9, 34.9),
}


def mean_sd_rows(results):
    """One probe row from several probe seeds: per layer ``top1`` (mean), ``top1_sd`` and ``train_top1`` (mean)."""
    import statistics

    row = {'_meta': results[0]['_meta']}
    for layer in (k for k in results[0] if not k.startswith('_')):
        vals = [r[layer]['top1'] for r in results]
        row[layer] = dict(results[0][layer], top1=statistics.fmean(vals),
                          top1_sd=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                          train_top1=statistics.fmean(r[layer]['train_top1'] for r in results))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--weights', nargs='*', default=[], metavar='FILE', help='weights files to probe besides random init')
    p.add_argument('--no-random', action='store_true', help='skip the random-init row')
    p.add_argument('--model', default='alexnet_spot')
    p.add_argument('--data', default=DEFAULT_DATA)
    p.add_argument('--train-per-class', type=int, default=1000)
    p.add_argument('--val-per-class', type=int, default=500)
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--epochs', type=int, default=20)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--weight-decay', type=float, default=0.1, help='the probe L2 weight decay for every layer')
    p.add_argument('--sweep-wd', type=float, nargs='+', default=None, metavar='WD',
                   help="choose each layer's weight decay among these, on 20 %% of the probe-training rows (first "
                        "probe seed; later seeds reuse the choice); the held-out rows are never used for it")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--seeds', type=int, nargs='*', default=None,
                   help='probe seeds (the linear classifiers\' init and data order; features are computed once): '
                        'rows then report mean +- SD over them')
    p.add_argument('--device', default='cpu', help="where features and probes run ('cuda' on a GPU)")
    p.add_argument('--labels', nargs='*', default=None, help='row names for --weights (default: file names)')
    p.add_argument('--workers', type=int, default=0)
    p.add_argument('--threads', type=int, default=1,
                   help='torch intra-op threads (default 1: on a busy 2-core machine 2 threads made the probe stage '
                        '6x slower through OpenMP contention; 0 = torch default)')
    p.add_argument('--cache-dir', default=None, help='feature cache (default ~/.cache/timm_spot/features)')
    p.add_argument('--no-cache', action='store_true')
    p.add_argument('--json', default=None, help='write results as JSON')
    p.add_argument('--paper', action='store_true', help="also print the paper's ImageNet Table 4 rows")
    args = p.parse_args(argv)

    if not os.path.isfile(args.data):
        print(f'CIFAR-10 parquet not found at {args.data}: nothing to benchmark (pass --data)', file=sys.stderr)
        return 2

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from timm_spot.eval.probe import ProbeConfig, format_table
    from timm_spot.eval.protocols import default_cache_dir, layerwise_probe

    command = 'python ' + ' '.join(shlex.quote(a) for a in [os.path.relpath(__file__, os.getcwd())] +
                                   (sys.argv[1:] if argv is None else list(argv)))
    cache = None if args.no_cache else (args.cache_dir or default_cache_dir())
    runs = ([] if args.no_random else [None]) + list(args.weights)
    labels = list(args.labels or [])
    if labels and len(labels) != len(args.weights):
        p.error(f'--labels: {len(labels)} names for {len(args.weights)} --weights files')
    seeds = args.seeds if args.seeds else [args.seed]
    t0 = time.time()
    rows, timings, per_seed = {}, {}, {}
    for i, w in enumerate(runs):
        if w is None:
            name = f'{args.model} (random init)'
        else:
            j = i - (len(runs) - len(args.weights))
            name = labels[j] if labels else f'{args.model} ({os.path.basename(w)})'
        t = time.time()
        results, chosen = [], None
        for seed in seeds:
            res = layerwise_probe(model_name=args.model, weights=w, source=args.data,
                                  train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                                  img_size=args.img_size, crop_pct=1.0, probe=ProbeConfig(
                                      epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=seed),
                                  cache_dir=cache, seed=args.seed, workers=args.workers, device=args.device,
                                  weight_decay_grid=args.sweep_wd, weight_decays=chosen)
            if args.sweep_wd and chosen is None:
                chosen = {k: v['weight_decay'] for k, v in res.items() if not k.startswith('_')}
            results.append(res)
        rows[name] = mean_sd_rows(results)
        per_seed[name] = [{k: v['top1'] for k, v in r.items() if not k.startswith('_')} for r in results]
        timings[name] = round(time.time() - t, 1)
    total = time.time() - t0

    meta = next(iter(rows.values()))['_meta']
    print()
    print(f'command: {command}')
    print(f'CIFAR-10 linear probes, top-1 % on the held-out {meta["n_val"]} images '
          f'({meta["n_train"]} training images, {args.img_size}px, {args.epochs} epochs, '
          f'{len(seeds)} probe seed(s){": mean, SD below" if len(seeds) > 1 else ""}):')
    print(format_table(rows))
    if len(seeds) > 1:
        print('SD over probe seeds:')
        print(format_table(rows, key='top1_sd'))
    if args.paper:
        print(format_table({k: {f'conv{i + 1}': {'top1': v} for i, v in enumerate(vals)}
                            for k, vals in PAPER_TABLE4.items()}))
    print('train top-1 %:')
    print(format_table(rows, key='train_top1'))
    print('pooled features: ' + ', '.join(f"{t['name']} {t['map'][0]}x{t['map'][1]}->{t['grid'][0]}x{t['grid'][1]} "
                                          f"({t['dim']})" for t in meta.get('taps') or []))
    for name, secs in timings.items():
        r = rows[name]['_meta']
        print(f"  {name}: {secs:.0f}s (features {r['seconds_features']:.0f}s"
              f"{', cached' if r['features_cached'] else ''}; probes {r['seconds']:.0f}s)")
    print(f'wall time {total:.0f}s on {os.cpu_count()} CPU core(s), torch {torch.__version__}, '
          f'{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(command=command, seeds=seeds, rows=rows, per_seed=per_seed, timings=timings,
                           wall_s=round(total, 1)), f, indent=2, default=str)
    return 0


if __name__ == '__main__':
    sys.exit(main())

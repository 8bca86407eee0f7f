"""Does ``pretrained=True`` help? Fine-tuning through timm's own ``train.py`` at 1 %, 10 % and 100 % of the labels.

A user runs ``timm.create_model('alexnet_spot', pretrained=True, num_classes=N)`` (conv1-conv5, average pool, a
new linear classifier) and fine-tunes it with timm's ``train.py``. This benchmark does exactly that on CIFAR-10 at
64 px from each initialisation and scores the result with timm's ``validate.py`` on the held-out rows.

Protocol (every choice the same for every initialisation):

* Rows: the last 500 images per class are the held-out test rows (``holdout_split``; never pretrained on, never
  used for a choice). From the other 4,500 per class a fixed validation split V (50 per class, seed 0) chooses
  the learning rate; the label fractions are drawn per seed from the remaining 4,450 per class: 1 % = 45 per class,
  10 % = 450, 100 % = 4,450. Subsets are nested (1 % of seed s lies inside 10 % of seed s) and shared by every
  initialisation, so differences between initialisations are paired.
* Variants: ``finetune`` (all layers train) and ``frozen`` (``freeze_trunk=True``: conv1-conv5 fixed, the linear
  head trains; the paper's frozen-conv5 protocol with a linear head instead of fc6/fc7).
* Schedule per fraction (``SCHEDULE``): AdamW, weight decay 0.05, cosine without warm-up, batch 64, timm's
  default label smoothing 0.1, RandomResizedCrop scale 0.35-1 and horizontal flips, eval at crop_pct 1.0.
* The learning rate of each (initialisation, variant, fraction) is the best of ``LR_GRID`` on V at seed 0; that
  seed-0 run is reported and the other seeds rerun with the chosen rate. Fine-tuning at 100 % (one seed) reuses the
  10 % choice; the frozen variant chooses at 100 % too (``GRID_FRACTIONS``).

``python benchmarks/finetune_c10.py --data PARQUET --root DIR --init random v2=W rotation=W2`` writes the image
folders once (symlinks into one pool of PNGs), runs every job (``--jobs`` in parallel, one thread each; finished
jobs are kept in ``results.jsonl`` so a killed run resumes) and writes the summary JSON; the table and figure come
from ``python benchmarks/finetune_c10_table.py``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

HELD_OUT_PER_CLASS = 500
VAL_PER_CLASS = 50
FRACTIONS = {'1%': 45, '10%': 450, '100%': None}  # images per class; None = all of the pool but V
SCHEDULE = {'1%': 30, '10%': 5, '100%': 1}  # epochs, the same for every initialisation
LR_GRID = {'finetune': (1e-4, 3e-4, 1e-3), 'frozen': (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)}
# the fractions whose rate is chosen on V, per variant; the others reuse the 10 % choice. A frozen trunk's linear
# head trains in a minute at 100 %, and the 10 % rate did not carry over to its 10x more updates (it diverged).
GRID_FRACTIONS = {'finetune': ('1%', '10%'), 'frozen': ('1%', '10%', '100%')}
SEEDED_FRACTIONS = ('1%', '10%')  # every --seeds value; the other fractions run seed 0 only
BATCH_SIZE = 64


@dataclass(frozen=True)
class Job:
    init: str
    variant: str
    fraction: str
    seed: int
    lr: float

    @property
    def key(self) -> str:
        return f'{self.init}|{self.variant}|{self.fraction}|s{self.seed}|lr{self.lr:g}'

    @property
    def name(self) -> str:
        return self.key.replace('|', '_').replace('%', 'pct')


# ----------------------------------------------------------------------------------------------------- the splits
def split_rows(labels: np.ndarray, seeds: Sequence[int]) -> Dict[str, object]:
    """Row indices: held-out test, V, and per seed a nested permutation of each class's training pool."""
    from timm_spot.data.sources import holdout_split

    pool, test = holdout_split(labels, per_class=HELD_OUT_PER_CLASS)
    rng = np.random.default_rng(0)
    val, train_pool = [], {}
    for c in np.unique(labels[pool]):
        rows = pool[labels[pool] == c]
        picked = rng.choice(rows, VAL_PER_CLASS, replace=False)
        val.append(picked)
        train_pool[int(c)] = np.setdiff1d(rows, picked)
    orders = {s: {c: np.random.default_rng(1000 + s).permutation(rows) for c, rows in train_pool.items()}
              for s in seeds}
    return {'test': np.sort(test), 'val': np.sort(np.concatenate(val)), 'orders': orders}


def fraction_rows(orders: Dict[int, np.ndarray], fraction: str) -> Dict[int, np.ndarray]:
    n = FRACTIONS[fraction]
    return {c: (rows if n is None else rows[:n]) for c, rows in orders.items()}


def _link_rows(pool_dir: str, out: str, rows_by_class: Dict[int, np.ndarray], names: List[str]) -> None:
    for c, rows in rows_by_class.items():
        folder = os.path.join(out, names[c])
        os.makedirs(folder, exist_ok=True)
        for r in rows.tolist():
            os.symlink(os.path.join(pool_dir, names[c], f'{r}.png'), os.path.join(folder, f'{r}.png'))


def prepare(data: str, root: str, seeds: Sequence[int]) -> Dict[str, object]:
    """Write every row once as ``pool/<class>/<row>.png``; the split folders are symlinks into it."""
    from timm_spot.data.sources import decode_image, load_image_source

    ds = load_image_source(data, split='train', image_column='image', label_column='label')
    labels = np.asarray(ds['label'])
    names = list(getattr(ds.features['label'], 'names', None) or [f'class{c}' for c in range(labels.max() + 1)])
    splits = split_rows(labels, seeds)
    done = os.path.join(root, 'prepared.json')
    if os.path.exists(done):
        meta = json.load(open(done))
        if meta['rows'] != len(labels) or meta['seeds'] != list(seeds):
            raise SystemExit(f'{root} was prepared for {meta["rows"]} rows and seeds {meta["seeds"]}; '
                             f'use another --root')
        return splits
    pool_dir = os.path.join(root, 'pool')
    for c in range(len(names)):
        os.makedirs(os.path.join(pool_dir, names[c]), exist_ok=True)
    for r in range(len(labels)):
        image = decode_image(ds[r]['image'])
        if image is None:
            raise SystemExit(f'row {r} of {data} does not decode as an image')
        image.convert('RGB').save(os.path.join(pool_dir, names[labels[r]], f'{r}.png'))
    by_class = lambda rows: {int(c): rows[labels[rows] == c] for c in np.unique(labels[rows])}  # noqa: E731
    _link_rows(pool_dir, os.path.join(root, 'test', 'test'), by_class(splits['test']), names)
    _link_rows(pool_dir, os.path.join(root, 'val'), by_class(splits['val']), names)
    for s, orders in splits['orders'].items():
        for fraction in FRACTIONS:
            job_root = os.path.join(root, f'{fraction.replace("%", "pct")}_s{s}')
            _link_rows(pool_dir, os.path.join(job_root, 'train'), fraction_rows(orders, fraction), names)
            os.symlink(os.path.join(root, 'val'), os.path.join(job_root, 'validation'))
    json.dump({'rows': len(labels), 'seeds': list(seeds), 'classes': names}, open(done, 'w'))
    return splits


# ------------------------------------------------------------------------------------------------------- one job
def train_command(job: Job, root: str, weights: Optional[str], train_script: str, out: str) -> List[str]:
    """timm's train.py, unchanged, as a user runs it (``--device-modules timm_spot`` registers the models)."""
    epochs = SCHEDULE[job.fraction]
    cmd = [sys.executable, train_script, '--device-modules', 'timm_spot', '--device', 'cpu', '--workers', '0',
           '--data-dir', os.path.join(root, f'{job.fraction.replace("%", "pct")}_s{job.seed}'),
           '--model', 'alexnet_spot', '--num-classes', '10', '--img-size', '64', '--crop-pct', '1.0',
           '--opt', 'adamw', '--lr', f'{job.lr:g}', '--weight-decay', '0.05', '--sched', 'cosine',
           '--warmup-epochs', '0', '--epochs', str(epochs), '-b', str(BATCH_SIZE), '--scale', '0.35', '1',
           '--seed', str(job.seed), '--val-interval', str(epochs), '--checkpoint-hist', '1',
           '--log-interval', '100000', '--output', out, '--experiment', job.name]
    if weights:
        cmd += ['--pretrained', '--pretrained-path', weights]
    if job.variant == 'frozen':
        cmd += ['--model-kwargs', 'freeze_trunk=True']
    return cmd


def validate_command(root: str, checkpoint: str, validate_script: str, results: str) -> List[str]:
    """timm's validate.py (it has no ``--device-modules``: our wrapper registers the models, then runs it)."""
    return [sys.executable, '-m', 'timm_spot.eval.timm_scripts', 'validate', validate_script, '--',
            '--device', 'cpu', '--workers', '0',
            '--data-dir', os.path.join(root, 'test'), '--split', 'test', '--model', 'alexnet_spot',
            '--num-classes', '10', '--img-size', '64', '--crop-pct', '1.0', '-b', '250',
            '--checkpoint', checkpoint, '--results-file', results, '--results-format', 'json']


def last_val_top1(summary_csv: str) -> float:
    with open(summary_csv) as f:
        rows = list(csv.DictReader(f))
    if not rows or 'eval_top1' not in rows[-1]:
        raise RuntimeError(f'{summary_csv} has no eval_top1 row')
    return float(rows[-1]['eval_top1'])


def start_job(job: Job, root: str, weights: Optional[str], scripts: Dict[str, str], work: str) -> dict:
    out = os.path.join(work, 'train')
    if os.path.isdir(os.path.join(out, job.name)):  # a killed run's leftovers (train.py would pick a new name)
        shutil.rmtree(os.path.join(out, job.name))
    log = open(os.path.join(work, 'logs', job.name + '.log'), 'w')
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    cmd = train_command(job, root, weights, scripts['train'], out)
    log.write(' '.join(cmd) + '\n')
    log.flush()
    return {'job': job, 'proc': subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
            'log': log, 'start': time.time(), 'out': os.path.join(out, job.name)}


def finish_job(running: dict, root: str, scripts: Dict[str, str]) -> dict:
    job, out = running['job'], running['out']
    running['log'].close()
    if running['proc'].returncode != 0:
        raise RuntimeError(f'train.py failed for {job.key}; see {running["log"].name}')
    train_s = time.time() - running['start']
    results = os.path.join(out, 'heldout.json')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    done = subprocess.run(validate_command(root, os.path.join(out, 'last.pth.tar'), scripts['validate'], results),
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f'validate.py failed for {job.key}:\n{done.stderr[-2000:]}')
    held = json.load(open(results))
    return {**asdict(job), 'key': job.key, 'val_top1': last_val_top1(os.path.join(out, 'summary.csv')),
            'heldout_top1': float(held['top1']),
            'epochs': SCHEDULE[job.fraction], 'train_seconds': round(train_s, 1)}


def run_jobs(jobs: Sequence[Job], root: str, inits: Dict[str, Optional[str]], scripts: Dict[str, str], work: str,
             results_path: str, parallel: int) -> None:
    """Run the jobs not yet in ``results_path`` (``parallel`` at a time); append each result as it finishes."""
    done = {r['key'] for r in read_results(results_path)}
    todo = [j for j in jobs if j.key not in done]
    running: List[dict] = []
    while todo or running:
        while todo and len(running) < parallel:
            job = todo.pop(0)
            running.append(start_job(job, root, inits[job.init], scripts, work))
        time.sleep(2)
        for r in [r for r in running if r['proc'].poll() is not None]:
            running.remove(r)
            row = finish_job(r, root, scripts)
            with open(results_path, 'a') as f:
                f.write(json.dumps(row) + '\n')
            print(f"{row['key']}: V {row['val_top1']:.1f}  held-out {row['heldout_top1']:.2f}  "
                  f"({row['train_seconds']:.0f} s)", flush=True)


def read_results(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


# --------------------------------------------------------------------------------------------------- the protocol
def chosen_lr(rows: Sequence[dict], init: str, variant: str, fraction: str) -> float:
    """The grid rate with the best V accuracy at seed 0 (ties: the smaller rate); the held-out rows play no part."""
    fraction = fraction if fraction in GRID_FRACTIONS[variant] else '10%'
    grid = [r for r in rows if (r['init'], r['variant'], r['fraction'], r['seed']) == (init, variant, fraction, 0)]
    if len(grid) < len(LR_GRID[variant]):
        raise RuntimeError(f'the learning-rate grid of {init}/{variant}/{fraction} is incomplete ({len(grid)} runs)')
    return min(grid, key=lambda r: (-r['val_top1'], r['lr']))['lr']


def grid_jobs(inits: Sequence[str], variants: Sequence[str]) -> List[Job]:
    return [Job(i, v, f, 0, lr) for v in variants for f in GRID_FRACTIONS[v] for i in inits for lr in LR_GRID[v]]


def seed_jobs(rows: Sequence[dict], inits: Sequence[str], variants: Sequence[str], seeds: Sequence[int],
              fractions: Sequence[str]) -> List[Job]:
    jobs = []
    for f in fractions:
        for v in variants:
            for i in inits:
                lr = chosen_lr(rows, i, v, f)
                for s in (seeds if f in SEEDED_FRACTIONS else seeds[:1]):
                    jobs.append(Job(i, v, f, s, lr))
    return [j for j in jobs if not (j.fraction in GRID_FRACTIONS[j.variant] and j.seed == 0)]  # ran in the grid


def summarise(rows: Sequence[dict], inits: Sequence[str], variants: Sequence[str]) -> dict:
    """Per (variant, fraction, init): the chosen rate, held-out top-1 per seed, mean, SD, and the paired gain."""
    table: dict = {}
    for v in variants:
        for f in FRACTIONS:
            cell = {}
            for i in inits:
                try:
                    lr = chosen_lr(rows, i, v, f)
                except RuntimeError:
                    continue
                runs = sorted((r for r in rows if (r['init'], r['variant'], r['fraction'], r['lr']) == (i, v, f, lr)),
                              key=lambda r: r['seed'])
                accs = {r['seed']: r['heldout_top1'] for r in runs}
                if accs:
                    vals = np.array(list(accs.values()))
                    cell[i] = {'lr': lr, 'top1': accs, 'mean': float(vals.mean()),
                               'sd': float(vals.std(ddof=1)) if len(vals) > 1 else None, 'seeds': len(vals)}
            if 'random' in cell:
                for i, c in cell.items():
                    common = sorted(set(c['top1']) & set(cell['random']['top1']))
                    gains = np.array([c['top1'][s] - cell['random']['top1'][s] for s in common])
                    if i != 'random' and len(gains):
                        c['gain_vs_random'] = {'mean': float(gains.mean()),
                                               'sd': float(gains.std(ddof=1)) if len(gains) > 1 else None}
            table.setdefault(v, {})[f] = cell
    return table


def run_all(args, root: str, inits: Dict[str, Optional[str]], scripts: Dict[str, str], results: str) -> None:
    """Prepare the folders, then per variant (one table completes before the next starts) the grid, then seeds."""
    prepare(args.data, root, args.seeds)
    names = list(inits)
    for variant in args.variants:
        run_jobs(grid_jobs(names, [variant]), root, inits, scripts, root, results, args.jobs)
        rows = read_results(results)
        run_jobs(seed_jobs(rows, names, [variant], args.seeds, args.fractions), root, inits, scripts, root, results,
                 args.jobs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data', default=None,
                   help='CIFAR-10 training split (Parquet: image and label columns); not read by --summarise-only')
    p.add_argument('--root', required=True, help='work folder: image folders, timm outputs, results.jsonl')
    p.add_argument('--init', nargs='+', default=['random'],
                   help="initialisations: 'random' or NAME=WEIGHTS (a backbone or discriminator safetensors)")
    p.add_argument('--variants', nargs='+', default=['finetune', 'frozen'], choices=sorted(LR_GRID))
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--fractions', nargs='+', default=list(FRACTIONS), choices=list(FRACTIONS))
    p.add_argument('--jobs', type=int, default=2, help='train.py processes at once (one thread each)')
    p.add_argument('--scripts', default=os.environ.get('TIMM_SCRIPTS_DIR'),
                   help="folder with timm's train.py and validate.py (default: $TIMM_SCRIPTS_DIR)")
    p.add_argument('--out', default=None, help='summary JSON (default: ROOT/finetune_c10.json)')
    p.add_argument('--summarise-only', action='store_true',
                   help='write the summary of the runs finished so far (a cell appears once its grid is complete)')
    args = p.parse_args(argv)
    if not args.data and not args.summarise_only:
        p.error('--data is required to run (only --summarise-only reads the finished runs alone)')
    if not args.scripts:
        p.error("timm's train.py is not in the wheel: pass --scripts or set TIMM_SCRIPTS_DIR")
    scripts = {k: os.path.join(args.scripts, f'{k}.py') for k in ('train', 'validate')}
    for path in scripts.values():
        if not os.path.isfile(path):
            p.error(f'{path} does not exist')
    inits: Dict[str, Optional[str]] = {}
    for item in args.init:
        name, _, weights = item.partition('=')
        if name != 'random' and not os.path.isfile(weights):
            p.error(f'--init {item}: expected random or NAME=WEIGHTS with an existing file')
        inits[name] = os.path.abspath(weights) if weights else None
    if 0 not in args.seeds:
        p.error('--seeds must include 0 (the seed that chooses the learning rate)')
    root = os.path.abspath(args.root)
    os.makedirs(os.path.join(root, 'logs'), exist_ok=True)
    results = os.path.join(root, 'results.jsonl')
    names, variants = list(inits), args.variants
    if not args.summarise_only:
        run_all(args, root, inits, scripts, results)
    rows = read_results(results)
    summary = {'command': 'python benchmarks/finetune_c10.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
               'inits': {k: (os.path.basename(os.path.dirname(v)) + '/' + os.path.basename(v) if v else None)
                         for k, v in inits.items()},
               'protocol': {'held_out_per_class': HELD_OUT_PER_CLASS, 'val_per_class': VAL_PER_CLASS,
                            'fractions_per_class': FRACTIONS, 'epochs': SCHEDULE, 'lr_grid': LR_GRID,
                            'batch_size': BATCH_SIZE, 'optimizer': 'adamw wd 0.05, cosine, no warm-up',
                            'device': 'cpu, 1 thread per train.py'},
               'table': summarise(rows, names, variants), 'runs': rows}
    out = args.out or os.path.join(root, 'finetune_c10.json')
    with open(out, 'w') as f:
        json.dump(summary, f, indent=1)
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

#!/usr/bin/env python
"""Does the fast default precision train like float32? Two stage-2 runs from one seed and one stage-1 autoencoder,
compared step by step.

Reads the ``metrics.jsonl`` of a float32 run and of a bf16 run (``benchmarks/pretext_study.py --variants fp32
bf16``: the same stage-1 autoencoder, seed, data order and masks; only the precision and memory format differ) and
writes, for windows of the run, the mean of each loss and accuracy in both runs and their difference, the largest
difference against a tolerance, and a PNG of the trajectories.

    python benchmarks/pretext_study.py --config train_scripts/configs/study_c10_64.yaml --out runs/numerics \\
        --make-ae ae=300 --steps 300 --variants fp32 bf16 --set log_every=10
    python benchmarks/pretext_study.py --config train_scripts/configs/study_c10_64.yaml --out runs/numerics \\
        --ae ae --steps 300 --variants fp32_2threads:mixed_precision=no,channels_last=false,threads=2 \\
        --set log_every=10
    python benchmarks/precision_tracking.py --reference runs/numerics/fp32 --candidate runs/numerics/bf16 \\
        --control runs/numerics/fp32_2threads --out docs/figures/precision_bf16_vs_fp32.png \\
        --json benchmarks/results/precision_bf16_vs_fp32.json

Two runs of an adversarial game from one seed drift apart by rounding alone (float32 on another thread count
does too), so they are compared by window means, not step by step: the tolerance is on what a reader of the logs
would conclude (C's accuracies, the mask head's AUC, the losses), not on bits.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Optional

KEYS = ('c_class', 'c_mask', 'r_adv', 'r_rec', 'acc_real', 'acc_corrupt', 'mask_auc', 'corrupt_l1_dropped')
# largest accepted |bf16 - fp32| of a window mean: accuracies and AUC in absolute points, losses relative
TOLERANCE = {'acc_real': 0.05, 'acc_corrupt': 0.05, 'mask_auc': 0.03}
RELATIVE_TOLERANCE = 0.05  # the losses and the L1: 5 % of the float32 value


def read(path: str) -> List[dict]:
    with open(os.path.join(path, 'metrics.jsonl'), 'r', encoding='utf-8') as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r for r in recs if r.get('stage') == 2]


def windows(recs: List[dict], count: int) -> List[List[dict]]:
    size = max(1, len(recs) // count)
    return [recs[i * size:(i + 1) * size] for i in range(count) if recs[i * size:(i + 1) * size]]


def compare(reference: List[dict], candidate: List[dict], count: int) -> Dict[str, object]:
    if [r['step'] for r in reference] != [r['step'] for r in candidate]:
        raise SystemExit('the two runs logged different steps: use the same log_every and stage length')
    rows, worst = [], {}
    for ref_w, cand_w in zip(windows(reference, count), windows(candidate, count)):
        row = {'steps': f"{ref_w[0]['step'] - (ref_w[1]['step'] - ref_w[0]['step'] if len(ref_w) > 1 else 0)}-"
                        f"{ref_w[-1]['step']}"}
        for k in KEYS:
            if k not in ref_w[0] or k not in cand_w[0]:
                continue
            a = statistics.fmean(r[k] for r in ref_w)
            b = statistics.fmean(r[k] for r in cand_w)
            limit = TOLERANCE.get(k, RELATIVE_TOLERANCE * abs(a))
            row[k] = (a, b)
            worst[k] = max(worst.get(k, (0.0, limit))[0], abs(b - a)), limit
        rows.append(row)
    passed = all(diff <= limit for diff, limit in worst.values())
    return {'windows': rows, 'worst': {k: {'abs_diff': d, 'tolerance': t} for k, (d, t) in worst.items()},
            'tracks': passed}


def plot(reference: List[dict], candidate: List[dict], out: str, control: Optional[List[dict]] = None) -> None:
    """One panel per metric, float32 in blue, bf16 in orange, the float32 control (if any) in green (PIL only)."""
    from PIL import Image, ImageDraw

    keys = [k for k in KEYS if k in reference[0]]
    cols, pw, ph, pad = 4, 260, 170, 28
    rows = (len(keys) + cols - 1) // cols
    img = Image.new('RGB', (cols * pw, rows * ph + 24), 'white')
    draw = ImageDraw.Draw(img)
    draw.text((6, 4), 'stage 2 from one seed: float32 (blue) vs bf16 + channels_last (orange)'
              + (', float32 on another thread count (green)' if control else ''), fill='black')
    for i, k in enumerate(keys):
        x0, y0 = (i % cols) * pw, 24 + (i // cols) * ph
        runs = (reference, candidate) + ((control,) if control else ())
        series = [[(r['step'], r[k]) for r in run] for run in runs]
        xs = [s for run in series for s, _ in run]
        ys = [v for run in series for _, v in run]
        lo, hi = min(ys), max(ys)
        hi = hi if hi > lo else lo + 1e-6
        left, right, top, bottom = x0 + pad + 8, x0 + pw - 8, y0 + 18, y0 + ph - pad

        def xy(step, v):
            return (left + (step - min(xs)) / max(1, max(xs) - min(xs)) * (right - left),
                    bottom - (v - lo) / (hi - lo) * (bottom - top))
        draw.rectangle([left, top, right, bottom], outline=(180, 180, 180))
        draw.text((x0 + pad, y0 + 2), k, fill='black')
        draw.text((x0 + 2, top), f'{hi:.3g}', fill=(90, 90, 90))
        draw.text((x0 + 2, bottom - 10), f'{lo:.3g}', fill=(90, 90, 90))
        draw.text((right - 40, bottom + 4), f'step {max(xs)}', fill=(90, 90, 90))
        for run, color in zip(series, ((31, 119, 180), (255, 127, 14), (44, 160, 44))):
            draw.line([xy(s, v) for s, v in run], fill=color, width=2)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    img.save(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--reference', required=True, help='the float32 run directory')
    p.add_argument('--candidate', required=True, help='the bf16 run directory')
    p.add_argument('--control', default=None,
                   help='a second float32 run that differs from the reference only by its thread count: how far '
                        'float32 drifts from itself (rounding order alone), the floor any precision is judged against')
    p.add_argument('--windows', type=int, default=6)
    p.add_argument('--out', default=None, help='PNG of the trajectories')
    p.add_argument('--json', default=None)
    args = p.parse_args(argv)
    reference, candidate = read(args.reference), read(args.candidate)
    result = compare(reference, candidate, args.windows)
    keys = [k for k in KEYS if k in result['windows'][0]]
    print('| steps | ' + ' | '.join(f'{k} fp32 / bf16' for k in keys) + ' |')
    print('|---|' + '---|' * len(keys))
    for row in result['windows']:
        print(f"| {row['steps']} | " + ' | '.join(f'{row[k][0]:.3f} / {row[k][1]:.3f}' for k in keys) + ' |')
    print('\nlargest window difference (tolerance): ' + ', '.join(
        f"{k} {v['abs_diff']:.3f} ({v['tolerance']:.3f})" for k, v in result['worst'].items()))
    print('bf16 tracks float32' if result['tracks'] else 'bf16 does NOT track float32 within the tolerance')
    control = read(args.control) if args.control else None
    if control is not None:
        drift = compare(reference, control, args.windows)
        result['float32_drift'] = drift['worst']
        # judged against float32's own drift where that exceeds the stated tolerance
        result['within_float32_drift'] = {
            k: v['abs_diff'] <= max(v['tolerance'], drift['worst'][k]['abs_diff']) for k, v in result['worst'].items()}
        result['tracks_or_within_float32_drift'] = all(result['within_float32_drift'].values())
        print('float32 vs float32 on another thread count, largest window difference: ' + ', '.join(
            f"{k} {v['abs_diff']:.3f}" for k, v in drift['worst'].items()))
        print('bf16 stays within the tolerance or float32\'s own drift on every metric'
              if result['tracks_or_within_float32_drift'] else
              'bf16 moves more than float32 drifts on: ' + ', '.join(
                  k for k, ok in result['within_float32_drift'].items() if not ok))
    if args.out:
        plot(reference, candidate, args.out, control)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(dict(result, command='python ' + ' '.join(sys.argv)), f, indent=1)
    return 0 if result.get('tracks_or_within_float32_drift', result['tracks']) else 1


if __name__ == '__main__':
    sys.exit(main())

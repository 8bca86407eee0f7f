#!/usr/bin/env python
"""Learning curve of a release: layerwise probe top-1 against stage-2 images seen, between the two brackets.

Reads the JSON files that ``benchmarks/probe_cifar10.py --json`` writes: one with the stage-2 snapshots (rows
labelled ``s2_step<N>``, from the trainer's ``snapshots`` option) and one with the brackets (``random init`` and
``supervised`` rows). Writes a PNG (one panel per layer: the curve, random init dashed grey, supervised dashed
green) and prints a Markdown table with the fraction of the random-to-supervised gap each snapshot closes
(the paper's Table 4 closes 57 % at conv5 and 71 % at conv4 on ImageNet).

    python benchmarks/learning_curve.py --curve curve.json --brackets brackets.json --batch-size 128 \\
        --out docs/figures/learning_curve.png
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Dict, List, Tuple

LAYERS = ('conv1', 'conv2', 'conv3', 'conv4', 'conv5')


def load_rows(path: str) -> Dict[str, Dict[str, Tuple[float, float]]]:
    """{row name: {layer: (mean top-1, SD)}} from a probe_cifar10.py JSON."""
    with open(path, 'r', encoding='utf-8') as f:
        rows = json.load(f)['rows']
    return {name: {k: (v['top1'], v.get('top1_sd', 0.0)) for k, v in r.items() if k in LAYERS}
            for name, r in rows.items()}


def gap_fraction(value: float, random: float, supervised: float) -> float:
    """Fraction of the random-to-supervised gap closed by ``value`` (0 = random init, 1 = supervised)."""
    return (value - random) / (supervised - random) if supervised != random else float('nan')


def snapshots(rows) -> List[Tuple[int, Dict[str, Tuple[float, float]]]]:
    out = []
    for name, r in rows.items():
        m = re.search(r's2_step(\d+)', name)
        if m:
            out.append((int(m.group(1)), r))
    return sorted(out)


def draw(curve, random, supervised, batch_size: int, out: str) -> None:
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    pw, ph, margin = 260, 220, 40
    img = Image.new('RGB', (pw * len(LAYERS) + margin, ph + 2 * margin), 'white')
    d = ImageDraw.Draw(img)
    values = [v[l][0] for _, v in curve for l in LAYERS] + [random[l][0] for l in LAYERS] + \
        [supervised[l][0] for l in LAYERS]
    lo, hi = 5 * int(min(values) // 5), 5 * int(max(values) // 5 + 1)
    n = len(curve)
    d.text((margin, 8), f'CIFAR-10 linear probe top-1 % vs stage-2 images seen (x {batch_size} x steps); '
                        'grey dashed: random init, green dashed: supervised', fill='black', font=font)
    for i, layer in enumerate(LAYERS):
        x0, y0 = margin + i * pw, margin
        w, h = pw - 30, ph - 30

        def xy(j, v):
            return x0 + 10 + j * (w - 20) / max(1, n - 1), y0 + h - (v - lo) / (hi - lo) * h

        d.rectangle([x0, y0, x0 + w, y0 + h], outline='black')
        for t in range(lo, hi + 1, 5):
            y = xy(0, t)[1]
            d.line([x0, y, x0 + 4, y], fill='black')
            if i == 0:
                d.text((x0 - 22, y - 6), str(t), fill='black', font=font)
        for level, color in ((random[layer][0], (150, 150, 150)), (supervised[layer][0], (0, 150, 0))):
            y = xy(0, level)[1]
            for xs in range(int(x0), int(x0 + w), 8):
                d.line([xs, y, xs + 4, y], fill=color, width=2)
        pts = [xy(j, v[layer][0]) for j, (_, v) in enumerate(curve)]
        d.line(pts, fill=(200, 30, 30), width=3)
        for j, ((step, v), p) in enumerate(zip(curve, pts)):
            sd = v[layer][1]
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=(200, 30, 30))
            if sd:
                d.line([p[0], xy(j, v[layer][0] - sd)[1], p[0], xy(j, v[layer][0] + sd)[1]], fill='black')
            d.text((p[0] - 10, y0 + h + 4 + 10 * (j % 2)), f'{step * batch_size / 1000:.0f}k', fill='black',
                   font=font)
        d.text((x0 + w / 2 - 15, y0 + 4), layer, fill='black', font=font)
    img.save(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--curve', required=True, help="probe JSON with the 's2_step<N>' snapshot rows")
    p.add_argument('--brackets', required=True, help="probe JSON with 'random init' and 'supervised' rows")
    p.add_argument('--batch-size', type=int, required=True, help='stage-2 global batch (images per step)')
    p.add_argument('--out', default=None, help='PNG to write')
    args = p.parse_args(argv)
    curve = snapshots(load_rows(args.curve))
    brackets = load_rows(args.brackets)
    random = next(v for k, v in brackets.items() if 'random' in k)
    supervised = next(v for k, v in brackets.items() if 'supervised' in k)
    if not curve:
        print(f'no s2_step<N> rows in {args.curve}', file=sys.stderr)
        return 2
    print('| stage-2 step (images) | ' + ' | '.join(LAYERS) + ' |')
    print('|---|' + '---|' * len(LAYERS))
    for name, row in (('random init', random), ('supervised', supervised)):
        print(f'| {name} | ' + ' | '.join(f'{row[l][0]:.1f} +- {row[l][1]:.1f}' for l in LAYERS) + ' |')
    for step, row in curve:
        cells = [f'{row[l][0]:.1f} +- {row[l][1]:.1f} ({100 * gap_fraction(row[l][0], random[l][0], supervised[l][0]):+.0f} %)'
                 for l in LAYERS]
        print(f'| {step} ({step * args.batch_size:,}) | ' + ' | '.join(cells) + ' |')
    if args.out:
        draw(curve, random, supervised, args.batch_size, args.out)
        print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

#!/usr/bin/env python
"""Table and figure of the fine-tuning benchmark (``finetune_c10.py``'s summary JSON).

    python benchmarks/finetune_c10_table.py benchmarks/results/finetune_c10.json --figure docs/figures/finetune_c10.png

Prints one Markdown table per variant (held-out top-1 %, mean +- SD over seeds, the paired gain over random init)
and draws accuracy against label fraction, one line per initialisation, error bars = SD over seeds (PIL only).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import List

COLORS = [(120, 120, 120), (200, 30, 30), (30, 90, 200), (0, 150, 0), (230, 140, 0), (140, 50, 160)]


def _fmt(mean: float, sd) -> str:
    return f'{mean:.1f}' if sd is None else f'{mean:.1f} ± {sd:.1f}'


def markdown(summary: dict) -> List[str]:
    lines = []
    inits = list(summary['inits'])
    for variant, by_fraction in summary['table'].items():
        fractions = [f for f in by_fraction if by_fraction[f]]
        if not fractions:
            continue
        lines += [f'**{variant}** (held-out top-1 %, mean ± SD over seeds; in brackets: paired gain over random init; '
                  'lr = the rate chosen on V)', '',
                  '| init | ' + ' | '.join(f'{f} labels' for f in fractions) + ' |',
                  '|---|' + '---|' * len(fractions)]
        for init in inits:
            cells = []
            for f in fractions:
                c = by_fraction[f].get(init)
                if not c:
                    cells.append('–')
                    continue
                text = f"{_fmt(c['mean'], c['sd'])} (n={c['seeds']}, lr {c['lr']:g})"
                if 'gain_vs_random' in c:
                    g = c['gain_vs_random']
                    text += f" [{'+' if g['mean'] >= 0 else ''}{_fmt(g['mean'], g['sd'])}]"
                cells.append(text)
            lines.append(f'| {init} | ' + ' | '.join(cells) + ' |')
        lines.append('')
    return lines


def verdict(summary: dict, init: str) -> str:
    """One plain sentence: at which label fractions ``init`` beats random init by more than the seeds' spread.

    "Helps" needs a paired gain larger than twice its SD over seeds (or, with one seed, larger than 2 points).
    """
    parts = []
    for variant, by_fraction in summary['table'].items():
        for f, cell in by_fraction.items():
            g = (cell.get(init) or {}).get('gain_vs_random')
            if not g:
                continue
            clear = g['mean'] > (2 * g['sd'] if g['sd'] is not None else 2.0)
            sd = f" ± {g['sd']:.1f}" if g['sd'] is not None else ' (one seed)'
            parts.append((variant, f, clear, f"{g['mean']:+.1f}{sd}"))
    helps = [f'{f} ({v}: {t})' for v, f, c, t in parts if c]
    not_helps = [f'{f} ({v}: {t})' for v, f, c, t in parts if not c]
    text = f'Against random initialisation, {init} helps at ' + (', '.join(helps) if helps else 'no label fraction')
    if not_helps:
        text += '; it does not clearly help at ' + ', '.join(not_helps)
    return text + ' (held-out top-1 points, paired by label subset and seed).'


def hub_entry(summary: dict, init: str, command: str) -> dict:
    """The ``finetuning`` entry a Hub card renders (hub/card.py: finetuning_results)."""
    p = summary['protocol']
    protocol = (f"timm's own train.py fine-tunes `timm.create_model('alexnet_spot', pretrained=..., num_classes=10)` "
                f"(conv1-conv5, average pool, linear) on CIFAR-10 at 64 px with {', '.join(p['fractions_per_class'])} "
                f"of the 4,450 labelled images per class that pretraining could see; validate.py scores it on the "
                f"{p['held_out_per_class']} held-out images per class. AdamW (weight decay 0.05), cosine, batch "
                f"{p['batch_size']}, {' / '.join(str(e) for e in p['epochs'].values())} epochs at "
                f"{' / '.join(p['epochs'])} for every initialisation; the learning rate of "
                f"each initialisation is chosen on a separate validation split ({p['val_per_class']} per class), "
                f"never on the held-out rows. `frozen`: conv1-conv5 fixed (`freeze_trunk=True`), only the head "
                f"trains. Device: {p['device']}. The schedules are short (what fitted 2 CPU cores): random init is "
                f"the least trained there, and the gaps at 100 % may shrink with longer fine-tuning (not measured).")
    edges = [(v, f, i) for v, t in summary['table'].items() for f, cell in t.items() for i, c in cell.items()
             if c['lr'] in (min(p['lr_grid'][v]), max(p['lr_grid'][v]))]
    if edges:
        protocol += (f' The chosen rate lies at an end of its grid in {len(edges)} of '
                     f"{sum(len(cell) for t in summary['table'].values() for cell in t.values())} cells "
                     f"({', '.join(sorted({v for v, _, _ in edges}))}): read those rows as lower bounds.")
    return {'protocol': protocol, 'command': command, 'this_weights': init, 'table': summary['table'],
            'summary': verdict(summary, init)}


def draw(summary: dict, path: str) -> None:
    """One panel per variant: x = label fraction (log), y = held-out top-1 %, one line per init, SD bars."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    variants = [v for v, t in summary['table'].items() if any(t.values())]
    if not variants:
        raise SystemExit('no finished cell to draw yet')
    inits = list(summary['inits'])
    w, h, m = 330, 260, 50
    img = Image.new('RGB', (len(variants) * (w + m) + m + 110, h + 2 * m + 30), 'white')
    d = ImageDraw.Draw(img)
    d.text((m, 8), 'CIFAR-10 at 64 px through timm train.py: held-out top-1 % (5,000 images) vs labels used; '
                   'bars: SD over seeds', fill='black', font=font)
    vals = [c['mean'] + s * (c['sd'] or 0) for t in summary['table'].values() for cell in t.values()
            for c in cell.values() for s in (-1, 1)]
    lo, hi = 10 * math.floor(min(vals) / 10), 10 * math.ceil(max(vals) / 10)
    fractions = ['1%', '10%', '100%']
    for p, variant in enumerate(variants):
        x0, y0 = m + p * (w + m), m
        d.rectangle([x0, y0, x0 + w, y0 + h], outline='black')
        d.text((x0 + 6, y0 + 4), variant, fill='black', font=font)
        X = lambda i: x0 + 30 + i * (w - 60) / 2  # noqa: E731
        Y = lambda v: y0 + h - (v - lo) / (hi - lo) * h  # noqa: E731
        for t in range(int(lo), int(hi) + 1, 10):
            d.line([x0, Y(t), x0 + 4, Y(t)], fill='black')
            d.text((x0 - 22, Y(t) - 6), str(t), fill='black', font=font)
        for i, f in enumerate(fractions):
            d.text((X(i) - 10, y0 + h + 6), f, fill='black', font=font)
        d.text((x0 + w // 2 - 40, y0 + h + 20), 'labels (log scale)', fill='black', font=font)
        for n, init in enumerate(inits):
            color = COLORS[n % len(COLORS)]
            pts = []
            for i, f in enumerate(fractions):
                c = summary['table'][variant].get(f, {}).get(init)
                if not c:
                    continue
                x = X(i) + (n - (len(inits) - 1) / 2) * 4  # a small offset so the bars do not hide each other
                pts.append((x, Y(c['mean'])))
                if c['sd']:
                    d.line([x, Y(c['mean'] - c['sd']), x, Y(c['mean'] + c['sd'])], fill=color, width=1)
                d.ellipse([x - 3, Y(c['mean']) - 3, x + 3, Y(c['mean']) + 3], fill=color)
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
    for n, init in enumerate(inits):
        d.text((m + len(variants) * (w + m), m + 14 * n), init, fill=COLORS[n % len(COLORS)], font=font)
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('summary', help="finetune_c10.py's JSON")
    p.add_argument('--figure', default=None, help='PNG to draw')
    p.add_argument('--hub-results', default=None,
                   help="a Hub results file (hub/results_<tag>.json): its alexnet_spot entry gets 'finetuning'")
    p.add_argument('--this-weights', default=None, help='the initialisation that is the weights of that Hub folder')
    p.add_argument('--command', default=None, help="the benchmark's command as the card should print it")
    args = p.parse_args(argv)
    summary = json.load(open(args.summary))
    print('\n'.join(markdown(summary)))
    for init in summary['inits']:
        if init != 'random':
            print(verdict(summary, init))
    if args.hub_results:
        if args.this_weights not in summary['inits']:
            p.error(f"--this-weights must name one of {list(summary['inits'])}")
        results = json.load(open(args.hub_results))
        results.setdefault('alexnet_spot', {})['finetuning'] = hub_entry(
            summary, args.this_weights, args.command or summary['command'])
        with open(args.hub_results, 'w') as f:
            json.dump(results, f, indent=1)
            f.write('\n')
        print(f'wrote the fine-tuning entry into {args.hub_results}')
    if args.figure:
        draw(summary, args.figure)
        print(f'wrote {args.figure}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

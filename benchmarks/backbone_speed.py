#!/usr/bin/env python
"""Inference speed of the ``alexnet_spot`` trunk next to torchvision's ``alexnet().features``, side by side.

Both models run in one process, alternating, for ``--rounds`` rounds of ``--iters`` timed forwards each (after a
warm-up), in float32 NCHW and in bf16 autocast + channels-last; images/s = batch / median forward time, and the
ratio spot / torchvision is taken per round (so a busy machine slows both). The spot trunk's output is also
compared with the same trunk built from the reference layers (timm's ``MaxPool2dSame`` by ``F.pad``, torch's
``nn.LocalResponseNorm``, out-of-place ReLUs: the trunk as it was before them), timed in the same rounds: the fast
layers must not change what it computes.

    python benchmarks/backbone_speed.py --img-size 224 --batch-size 64 --threads 2 --json F

Note the two are not the same network: the spot trunk (TF-'SAME' padding, no pool5, grouped conv2/4/5 with 96/256/384
channels) costs about 1.13x the multiply-adds of torchvision's (0.74 vs 0.66 GMAC per 224-px image), so at equal
efficiency the ratio is about 0.88.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torchvision

import timm
import timm_spot  # noqa: F401  (registers alexnet_spot)
from timm_spot.models._spot_layers import reference_trunk


def timed(model: nn.Module, x: torch.Tensor, iters: int, bf16: bool) -> float:
    times = []
    with torch.inference_mode(), torch.autocast('cpu', torch.bfloat16, enabled=bf16):
        for _ in range(iters):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--iters', type=int, default=3, help='timed forwards per model and round')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--json', help='write the results here')
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spot = timm.create_model('alexnet_spot', num_classes=0).features.eval()
    tv = torchvision.models.alexnet().features.eval()
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size) * 60  # the spot input scale (0..255 - mean)

    results = {}
    for precision, bf16, fmt in (('fp32', False, torch.contiguous_format), ('bf16_channels_last', True,
                                                                            torch.channels_last)):
        xs = x.contiguous(memory_format=fmt)
        models = {'alexnet_spot': spot.to(memory_format=fmt), 'torchvision': tv.to(memory_format=fmt)}
        models['alexnet_spot_reference_layers'] = reference_trunk(spot)  # the trunk before the fast layers
        with torch.inference_mode(), torch.autocast('cpu', torch.bfloat16, enabled=bf16):
            out = spot(xs).float()
            ref = reference_trunk(spot)(xs).float()
        with torch.inference_mode():
            truth = spot(x).float() if bf16 else ref  # the float32 result, for bf16's own rounding
        scale = truth.abs().max()
        max_rel = ((out - ref).abs().max() / scale).item()
        rounding = {'alexnet_spot': ((out - truth).abs().max() / scale).item(),
                    'reference_layers': ((ref - truth).abs().max() / scale).item()}
        for m in models.values():
            timed(m, xs, 1, bf16)  # warm-up
        rounds = []
        for _ in range(args.rounds):
            rounds.append({n: args.batch_size / timed(m, xs, args.iters, bf16) for n, m in models.items()})
        res = {n: statistics.median(r[n] for r in rounds) for n in models}
        res['ratio'] = statistics.median(r['alexnet_spot'] / r['torchvision'] for r in rounds)
        res['ratio_reference_layers'] = statistics.median(r['alexnet_spot_reference_layers'] / r['torchvision']
                                                          for r in rounds)
        res['max_rel_diff_vs_reference_layers'] = max_rel
        res['max_rel_diff_vs_float32'] = rounding
        results[precision] = res
        print(f"{precision:<20} alexnet_spot {res['alexnet_spot']:7.1f} img/s   torchvision {res['torchvision']:7.1f}"
              f" img/s   ratio {res['ratio']:.2f} (reference layers: {res['alexnet_spot_reference_layers']:.1f} img/s,"
              f" ratio {res['ratio_reference_layers']:.2f})   |spot - reference layers| / max {max_rel:.1e}")
    out = {'args': vars(args), 'torch': torch.__version__, 'results': results}
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == '__main__':
    sys.exit(main() and 0)

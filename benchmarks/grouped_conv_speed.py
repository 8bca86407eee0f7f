#!/usr/bin/env python
"""Is a grouped convolution (conv2/4/5 of the spot trunk, groups=2) on its fastest CPU kernel?

Times each grouped layer three ways with the same result: torch's grouped convolution (what the model runs), one
dense convolution with a block-diagonal weight (twice the multiply-adds), and two half convolutions concatenated;
float32 NCHW and bf16 channels-last, inference, batch 64 at the layer's 224-px map size.

    python benchmarks/grouped_conv_speed.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# (name, in channels, out channels, kernel, map size at 224 px)
LAYERS = (('conv2', 96, 256, 5, 28), ('conv4', 384, 384, 3, 14), ('conv5', 384, 256, 3, 14))


def median_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--iters', type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f'{"layer":<6} {"precision":<10} {"grouped ms":>10} {"dense block-diag ms":>20} {"split + cat ms":>15}')
    for name, cin, cout, k, hw in LAYERS:
        x = torch.randn(args.batch_size, cin, hw, hw)
        w = torch.randn(cout, cin // 2, k, k)
        b = torch.randn(cout)
        dense = torch.zeros(cout, cin, k, k)
        dense[:cout // 2, :cin // 2], dense[cout // 2:, cin // 2:] = w[:cout // 2], w[cout // 2:]
        for precision in ('fp32', 'bf16_cl'):
            if precision == 'bf16_cl':
                x, w, dense, b = (t.bfloat16() for t in (x, w, dense, b))
                x = x.contiguous(memory_format=torch.channels_last)
            pad = k // 2
            with torch.inference_mode():
                grouped = median_ms(lambda: F.conv2d(x, w, b, padding=pad, groups=2), args.iters)
                block = median_ms(lambda: F.conv2d(x, dense, b, padding=pad), args.iters)
                split = median_ms(lambda: torch.cat([
                    F.conv2d(x[:, :cin // 2], w[:cout // 2], b[:cout // 2], padding=pad),
                    F.conv2d(x[:, cin // 2:], w[cout // 2:], b[cout // 2:], padding=pad)], 1), args.iters)
            print(f'{name:<6} {precision:<10} {grouped:>10.1f} {block:>20.1f} {split:>15.1f}')


if __name__ == '__main__':
    main()

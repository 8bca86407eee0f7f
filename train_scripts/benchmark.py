#!/usr/bin/env python
"""Training throughput of the two pretraining stages (images/s), for one image size, batch and device.

Variants: ``eager`` (float32, NCHW), ``channels_last``, ``bf16`` (autocast; where the device supports it) and
``compile`` (``torch.compile`` of the forward passes). Each variant runs ``--warmup`` untimed iterations, then
``--iters`` timed ones; the median time per iteration gives images/s (batch / median). The iteration is the
trainer's: stage 1 = autoencoder forward + 30*MSE + weight decay, backward, Adam step; stage 2 = D(E(x)) (no grad),
damage & repair, C step on [real; corrupt] (class + mask loss), R step through the updated C (adversarial + kept-cell
L2). Synthetic images (data loading is not measured).

    python train_scripts/benchmark.py --img-size 64 --batch-size 16 --device cpu
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

if __package__ in (None, ''):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

import torch  # noqa: E402

from train_scripts import losses as L  # noqa: E402
from train_scripts.trainer import AutoencoderStep, PretextStep, RepairStep, preserved_batchnorm_stats  # noqa: E402

VARIANTS = ('eager', 'channels_last', 'bf16', 'compile')


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def bf16_supported(device: torch.device) -> bool:
    if device.type == 'cuda':
        return torch.cuda.is_bf16_supported()
    if device.type == 'cpu':
        try:
            with torch.autocast('cpu', dtype=torch.bfloat16):
                torch.nn.functional.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3))
            return True
        except Exception:
            return False
    return False


def build(args, variant: str, device: torch.device):
    import timm
    import timm_spot  # noqa: F401

    torch.manual_seed(0)
    gen_kwargs = {} if args.widths == 'paper' else dict(stem_width=8, widths=(8, 16, 32, 64))
    gen = timm.create_model('damage_repair_generator', **gen_kwargs).to(device)
    disc = timm.create_model('alexnet_spot_discriminator', head_kernel_size=args.img_size // 16).to(device)
    if variant == 'channels_last':
        gen = gen.to(memory_format=torch.channels_last)
        disc = disc.to(memory_format=torch.channels_last)
    return gen, disc


def run_variant(args, variant: str, device: torch.device):
    gen, disc = build(args, variant, device)
    b, s = args.batch_size, args.img_size
    x = torch.rand(b, 3, s, s, device=device) * 2 - 1
    if variant == 'channels_last':
        x = x.contiguous(memory_format=torch.channels_last)
    autocast_dtype = torch.bfloat16 if variant == 'bf16' else None

    def autocast():
        if autocast_dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=autocast_dtype)

    ae_step, c_step, r_step = AutoencoderStep(gen), PretextStep(disc), RepairStep(gen)
    if variant == 'compile':
        ae_step, c_step, r_step = torch.compile(ae_step), torch.compile(c_step), torch.compile(r_step)
    adam = dict(lr=3e-4, betas=(0.5, 0.999), eps=1e-5)

    # ---- stage 1
    gen.requires_grad_(False)
    ae_params = list(gen.autoencoder_parameters())
    for p in ae_params:
        p.requires_grad_(True)
    gen.train()
    opt = torch.optim.Adam(ae_params, **adam)
    decay = L.decayed_parameters(gen, ae_params)

    def stage1():
        with autocast():
            y = ae_step(x)
        loss = L.reconstruction_loss(y, x) + L.weight_decay_loss(decay, 5e-5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # ---- stage 2
    def stage2_setup():
        gen.requires_grad_(False)
        r_params = list(gen.repair_parameters())
        for p in r_params:
            p.requires_grad_(True)
        gen.train()
        gen.encoder.eval()
        gen.decoder.eval()
        disc.train()
        return r_params

    grid = (s // 16, s // 16)
    mask_gen = torch.Generator().manual_seed(0)

    def make_stage2(r_params):
        c_opt = torch.optim.Adam(disc.parameters(), **adam)
        r_opt = torch.optim.Adam(r_params, **adam)
        c_decay, r_decay = L.decayed_parameters(disc), L.decayed_parameters(gen, r_params)

        def stage2():
            mask = gen.sample_mask(b, grid, 0.7, generator=mask_gen).to(device)
            with torch.no_grad(), autocast():
                x_real = gen.autoencode(x).float()
            with autocast():
                x_hat = r_step(x, mask).float()
            with autocast():
                logits, mask_logits = c_step(torch.cat([x_real, x_hat.detach()]))
            c_loss = L.discriminator_class_loss(logits[:b], logits[b:]) + \
                0.1 * L.mask_loss(mask_logits[:b], mask_logits[b:], mask) + L.weight_decay_loss(c_decay, 5e-5)
            c_opt.zero_grad(set_to_none=True)
            c_loss.backward()
            c_opt.step()
            disc.requires_grad_(False)
            with preserved_batchnorm_stats(disc), autocast():
                r_logits, _ = c_step(torch.cat([x_real, x_hat]))
            r_loss = L.generator_adversarial_loss(r_logits[b:]) + 30 * L.kept_cells_l2_loss(x_hat, x, mask) + \
                L.weight_decay_loss(r_decay, 5e-5)
            r_opt.zero_grad(set_to_none=True)
            r_loss.backward()
            r_opt.step()
            disc.requires_grad_(True)
        return stage2

    results = {}
    for name, fn in (('stage1', lambda: stage1), ('stage2', lambda: make_stage2(stage2_setup()))):
        step = fn()
        for _ in range(args.warmup):
            step()
        _sync(device)
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        results[name] = {'median_s': med, 'img_per_s': b / med, 'iters': args.iters}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--iters', type=int, default=7, help='timed iterations per stage (median reported)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed iterations first (compile happens here)')
    parser.add_argument('--variants', default=','.join(VARIANTS), help=f'comma list of {VARIANTS}')
    parser.add_argument('--widths', choices=('paper', 'tiny'), default='paper',
                        help="generator widths: the paper's (32; 64-128-256-512) or tiny ones (8; 8-16-32-64)")
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--json', default=None, help='also write the results to this JSON file')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f'benchmark: {args.img_size}px, batch {args.batch_size}, device {device}, widths {args.widths}, '
          f'threads {torch.get_num_threads()}, torch {torch.__version__}; median of {args.iters} iterations after '
          f'{args.warmup} warm-up', flush=True)
    print(f'{"variant":<14} {"stage-1 img/s":>14} {"stage-2 img/s":>14}', flush=True)
    report = {'img_size': args.img_size, 'batch_size': args.batch_size, 'device': str(device),
              'threads': torch.get_num_threads(), 'widths': args.widths, 'results': {}}
    for variant in [v.strip() for v in args.variants.split(',') if v.strip()]:
        if variant not in VARIANTS:
            parser.error(f'unknown variant {variant!r}')
        if variant == 'bf16' and not bf16_supported(device):
            print(f'{variant:<14} {"unsupported":>14} {"unsupported":>14}', flush=True)
            report['results'][variant] = 'unsupported on this device'
            continue
        try:
            res = run_variant(args, variant, device)
        except Exception as e:  # e.g. torch.compile without a working C++ toolchain
            reason = f'{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ""}'
            print(f'{variant:<14} failed: {reason}', flush=True)
            if os.environ.get('BENCHMARK_TRACEBACK'):
                traceback.print_exc()
            report['results'][variant] = f'failed: {reason}'
            continue
        report['results'][variant] = res
        print(f'{variant:<14} {res["stage1"]["img_per_s"]:>14.2f} {res["stage2"]["img_per_s"]:>14.2f}', flush=True)
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())

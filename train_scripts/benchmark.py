#!/usr/bin/env python
"""Training throughput of the two pretraining stages (images/s): the trainer's own step functions, timed.

Each variant builds a :class:`~train_scripts.context.StepContext` with the variant's settings (in a fresh process:
Accelerate's precision is process-wide), then times the stages' own ``Stage1.step`` and ``Stage2.step`` (stages.py) on
synthetic images in [-1, 1] (history buffer, both objectives, weight decay, NaN check and Adam included; data
loading is not: it runs in worker processes). ``--warmup`` untimed steps,
then ``--iters`` timed ones; images/s = batch / median step time. Each stage's FLOPs per image (counted by
``FlopCounterMode`` over one step) and its FLOP/s are printed next to the FLOP/s of one large convolution in the same
precision (``conv peak``): how far the step is from what this machine's kernels can do.

Variants: ``eager`` (float32, NCHW), ``channels_last``, ``bf16`` (autocast, NCHW), ``bf16_cl`` (autocast +
channels_last), ``default`` (what ``pretrain.py`` runs by default on this machine: config 'auto'), ``compile`` (the
default with ``compile: true``: torch.compile of the prepared forwards), ``system_malloc`` (the default with
``retain_freed_memory: false``: glibc's own mmap/unmap of large blocks).

    python train_scripts/benchmark.py --img-size 64 --batch-size 32 --threads 2 --variants eager,default --json F
    python train_scripts/benchmark.py --variants default --profile 5   # + per-phase and top-op tables
    python train_scripts/benchmark.py --ab trunk_layers --threads 2    # one change on vs off, in one process
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

if __package__ in (None, ''):
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

VARIANTS = {
    'eager': dict(mixed_precision='no', channels_last=False),
    'channels_last': dict(mixed_precision='no', channels_last=True),
    'bf16': dict(mixed_precision='bf16', channels_last=False),
    'bf16_cl': dict(mixed_precision='bf16', channels_last=True),
    'default': {},
    'compile': dict(compile=True),
    'system_malloc': dict(retain_freed_memory=False),
}


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_steps(step_fn, x: torch.Tensor, warmup: int, iters: int, device: torch.device) -> list:
    times = []
    for i in range(warmup + iters):
        _sync(device)
        t = time.perf_counter()
        step_fn(i, x)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def profile_steps(step_fn, x: torch.Tensor, steps: int, label: str, rows: int = 15) -> str:
    """Per-phase (record_function labels of the trainer) and top-op tables of ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == 'cuda' else [])
    with profile(activities=acts) as prof:
        for i in range(steps):
            step_fn(1000 + i, x)
    events = prof.key_averages()
    key = 'self_cuda_time_total' if x.device.type == 'cuda' else 'self_cpu_time_total'
    phases = [e for e in events if e.key.startswith('stage')]
    lines = [f'--- {label}: phases (CPU wall time incl. children, ms per step)']
    for e in sorted(phases, key=lambda e: -e.cpu_time_total):
        lines.append(f'  {e.key:<40} {e.cpu_time_total / 1e3 / steps:9.1f}')
    lines.append(f'--- {label}: top ops by self time')
    lines.append(events.table(sort_by=key, row_limit=rows, max_name_column_width=40))
    return '\n'.join(lines)


def step_flops(step_fn, x: torch.Tensor, step: int) -> float:
    """Floating-point operations of one step (torch's FlopCounterMode: convolutions, matmuls, forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        step_fn(step, x)
    return float(counter.get_total_flops())


def conv_peak_flops(ctx, warmup: int = 2, iters: int = 5) -> float:
    """FLOP/s of one large 3x3 convolution (256 -> 256 channels, batch 32, 32x32) in the variant's precision and
    memory format: about the best this machine's convolution kernels reach, the yardstick for the step's rate."""
    x = ctx.memory_format(torch.randn(32, 256, 32, 32, device=ctx.device))
    w = torch.randn(256, 256, 3, 3, device=ctx.device)
    flops = 2 * 32 * 256 * 32 * 32 * 256 * 9
    times = []
    with torch.no_grad(), ctx.autocast():
        for i in range(warmup + iters):
            _sync(ctx.device)
            t = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=1)
            _sync(ctx.device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
    return flops / statistics.median(times)


def build_context(args, tmp: str, **settings):
    """The stages' :class:`StepContext` with the benchmark's settings (built-in data, no workers; no trainer) and a
    fixed synthetic batch; returns ``(context, batch, mixed_precision)``."""
    from timm_spot.run_layout import RunLayout
    from train_scripts import config as config_lib
    from train_scripts.context import StepContext, make_accelerator
    from train_scripts.history import HistoryBuffer
    from train_scripts.networks import NetworkBuilder

    user = dict(data='builtin', img_size=args.img_size, batch_size=args.batch_size, output_dir=tmp,
                threads=args.threads, progress=False, num_workers=0, history_batches=10,
                cpu=args.device == 'cpu', **settings)
    cfg = config_lib.resolve(user)
    accelerator, mixed_precision, channels_last = make_accelerator(cfg, RunLayout(os.path.abspath(tmp)))
    networks = NetworkBuilder(cfg, accelerator.device)
    m = cfg.method
    history = HistoryBuffer(m.history_batches * cfg.schedule.batch_size, m.history_fraction, enabled=m.history)
    ctx = StepContext(cfg, accelerator, networks, history, {1: 10 ** 6, 2: 10 ** 6},
                      generator=networks.create_generator(), channels_last=channels_last)
    g = torch.Generator().manual_seed(0)
    x = ctx.memory_format((torch.rand(args.batch_size, 3, args.img_size, args.img_size, generator=g) * 2 - 1)
                          .to(ctx.device))
    return ctx, x, mixed_precision


def build_stage(ctx, number: int):
    """Stage ``number``'s step object, on an empty history buffer, its networks in training mode."""
    from train_scripts.stages import Stage1, Stage2

    ctx.history.clear()
    stage = Stage1(ctx) if number == 1 else Stage2(ctx)
    stage.set_modes()
    return stage


def set_parameter_layout(stage, channels_last: bool) -> None:
    """4-D parameters of C and R (and their Adam states) channels-last, or contiguous (as the trainer keeps
    them)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    updates = [u for u in (stage.c_update, stage.r_update) if u is not None]
    for update in updates:
        for group in update.optimizer.param_groups:
            for p in group['params']:
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=fmt)
                    state = update.optimizer.state.get(p, {})
                    for k, v in state.items():
                        if torch.is_tensor(v) and v.dim() == 4:
                            state[k] = v.contiguous(memory_format=fmt)


def ab_compare(args) -> dict:
    """Stage 2 with one change on and off in ONE process (same networks, data and machine load), alternating the
    order every round: ``--ab-rounds`` rounds of 1 untimed + ``--iters`` timed steps per setting. Changes:
    ``retain_freed_memory`` (glibc keeps freed memory vs its defaults), ``trunk_layers`` (the discriminator's fast
    pooling / LRN / in-place ReLUs vs the reference layers they replace), ``contiguous_params`` (contiguous vs
    channels-last parameters and Adam states)."""
    from train_scripts.allocator import retain_freed_memory
    from timm_spot.models._spot_layers import reference_trunk

    with tempfile.TemporaryDirectory() as tmp:
        ctx, x, _ = build_context(args, tmp, retain_freed_memory=False)
        stage = build_stage(ctx, 2)
        fast_trunk = stage.disc.features
        ref_trunk = reference_trunk(fast_trunk)
        switch = {
            'retain_freed_memory': lambda on: retain_freed_memory(on),
            'trunk_layers': lambda on: setattr(stage.disc, 'features', fast_trunk if on else ref_trunk),
            'contiguous_params': lambda on: set_parameter_layout(stage, channels_last=not on),
        }[args.ab]
        times = {True: [], False: []}
        step = 0
        for r in range(args.ab_rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                switch(on)
                times[on] += time_steps(lambda i, xx: stage.step(step + i, xx), x, 1, args.iters, ctx.device)
                step += args.iters + 1
        on_s, off_s = statistics.median(times[True]), statistics.median(times[False])
    return {'change': args.ab, 'img_size': args.img_size, 'batch_size': args.batch_size,
            'threads': torch.get_num_threads(), 'on_img_per_s': args.batch_size / on_s,
            'off_img_per_s': args.batch_size / off_s, 'speedup': off_s / on_s}


def worker(args) -> dict:
    """One variant, in this process: build the step context, time the two stages' step functions."""
    settings = dict(VARIANTS[args.variant])
    with tempfile.TemporaryDirectory() as tmp:
        ctx, x, mixed_precision = build_context(args, tmp, **settings)
        device = ctx.device
        out = {'mixed_precision': mixed_precision, 'channels_last': ctx.channels_last,
               'threads': torch.get_num_threads()}
        profiles = []
        for number in (1, 2):
            stage = build_stage(ctx, number)
            step_fn = stage.step
            times = time_steps(step_fn, x, args.warmup, args.iters, device)
            med = statistics.median(times)
            flops = step_flops(step_fn, x, 10 ** 5)
            out[f'stage{number}'] = {'img_per_s': args.batch_size / med, 'median_s': med,
                                    'times_s': [round(t, 4) for t in times],
                                    'gflop_per_image': flops / args.batch_size / 1e9, 'gflop_per_s': flops / med / 1e9}
            if args.profile:
                profiles.append(profile_steps(step_fn, x, args.profile, f'{args.variant} stage {number}'))
        out['conv_peak_gflop_per_s'] = conv_peak_flops(ctx) / 1e9
        if profiles:
            out['profile'] = '\n'.join(profiles)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--img-size', type=int, default=64)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--iters', type=int, default=7, help='timed steps per stage (median reported)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps first')
    parser.add_argument('--variants', default='eager,default', help=f'comma list of {", ".join(VARIANTS)}')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: the trainer\'s)')
    parser.add_argument('--profile', type=int, default=0, metavar='STEPS',
                        help='also profile STEPS steps per stage (torch.profiler: phases and top ops)')
    parser.add_argument('--json', default=None, help='also write the results to this JSON file')
    parser.add_argument('--ab', default=None, choices=('retain_freed_memory', 'trunk_layers', 'contiguous_params'),
                        help='instead of the variants: stage 2 with this one change on and off, alternating in one '
                             'process (the speed-up of the change alone)')
    parser.add_argument('--ab-rounds', type=int, default=8, help='--ab: on/off rounds')
    parser.add_argument('--variant', default=None, help=argparse.SUPPRESS)  # internal: run one variant here
    args = parser.parse_args(argv)

    if args.ab:
        res = ab_compare(args)
        print(f"{res['change']}: stage 2 at {res['img_size']}px, batch {res['batch_size']}, {res['threads']} threads: "
              f"on {res['on_img_per_s']:.1f} img/s, off {res['off_img_per_s']:.1f} img/s, {res['speedup']:.2f}x")
        if args.json:
            with open(args.json, 'w', encoding='utf-8') as f:
                json.dump(res, f, indent=1)
        return 0

    if args.variant:
        print(json.dumps(worker(args)))
        return 0

    variants = [v.strip() for v in args.variants.split(',') if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f'unknown variant {v!r}: choose from {", ".join(VARIANTS)}')
    print(f'benchmark: {args.img_size}px, batch {args.batch_size}, device {args.device}, torch {torch.__version__}; '
          f'median of {args.iters} steps after {args.warmup} warm-up, each variant in a fresh process', flush=True)
    print(f'{"variant":<14} {"precision":>9} {"ch_last":>7} {"threads":>7} {"stage-1 img/s":>14} '
          f'{"stage-2 img/s":>14} {"GFLOP/img 1/2":>14} {"GFLOP/s 1/2":>12} {"conv peak":>10}', flush=True)
    report = {'img_size': args.img_size, 'batch_size': args.batch_size, 'device': args.device,
              'torch': torch.__version__, 'results': {}}
    base = [sys.executable, os.path.abspath(__file__), '--img-size', str(args.img_size), '--batch-size',
            str(args.batch_size), '--device', args.device, '--iters', str(args.iters), '--warmup', str(args.warmup),
            '--profile', str(args.profile)] + (['--threads', str(args.threads)] if args.threads else [])
    for v in variants:
        proc = subprocess.run(base + ['--variant', v], capture_output=True, text=True)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ['no output'])[-1][:200]
            print(f'{v:<14} failed: {reason}', flush=True)
            report['results'][v] = f'failed: {reason}'
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        report['results'][v] = res
        s1, s2 = res['stage1'], res['stage2']
        print(f'{v:<14} {res["mixed_precision"]:>9} {str(res["channels_last"]):>7} {res["threads"]:>7} '
              f'{s1["img_per_s"]:>14.2f} {s2["img_per_s"]:>14.2f} {s1["gflop_per_image"]:>6.2f} / '
              f'{s2["gflop_per_image"]:<5.2f} {s1["gflop_per_s"]:>5.0f} / {s2["gflop_per_s"]:<4.0f} '
              f'{res["conv_peak_gflop_per_s"]:>10.0f}', flush=True)
    for v in variants:
        res = report['results'][v]
        if isinstance(res, dict) and res.get('profile'):
            print(res['profile'])
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())

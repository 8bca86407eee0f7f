#!/usr/bin/env python
"""Today's stage steps (stages.py) vs the fast steps (train_scripts/fast_step.py + device_data.py) in ONE process,
then training with the fast steps for the rest of the time budget. Made for one call of at most 8 minutes on one GPU;
``--smoke`` runs a few steps of everything on the CPU (tests/test_fast_benchmark.py).

Timing, per stage (1, 2), image size (``--px``) and batch (``--batch``, ``--baseline-batch``): rounds alternate the
reference step (``Stage*.step`` on a batch already on the device: no data loading, generous to it) and the fast step
(its on-device batch, ``DeviceImages.batch``, included; ``--fixed-batch`` adds the fast step on the reference's batch),
each seeded per step as the trainer does; img/s = batch / median step time. FLOPs per step are counted (``FlopCounterMode``, as benchmark.py) and divided by the card's dense
bf16 peak (``PEAK_BF16``; elsewhere one large bf16 convolution's FLOP/s measured here). Peak memory per measurement.

Training: CIFAR-10 decoded once onto the device, stage 1 then stage 2 with the fast steps at ``--train-px``; metrics
(``metrics.jsonl``), discriminator snapshots and the stage-1/2 generator (safetensors) under ``--out``; the summary in
``--out``/stage2_speed.json (fields: results[] with stage, px, batch, variant, img_per_s; and per stage and px
baseline_img_per_s, new_img_per_s, ratio, device, peak_mem, fraction_of_peak).

    python benchmarks/gpu/stage2_speed.py --out "$OUT"                          # GPU, <= 8 min
    python benchmarks/gpu/stage2_speed.py --device cpu --threads 1 --px 64 --batch 64 --baseline-batch 64 \\
        --iters 30 --train-seconds 0 --out /tmp/cpu_speed                          # CPU: old vs new side by side
    python benchmarks/gpu/stage2_speed.py --smoke --out /tmp/smoke                  # CPU, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402

from train_scripts import benchmark as bench  # noqa: E402
from train_scripts.batches import TAG_TORCH, derive_seed  # noqa: E402
from train_scripts.context import StepContext  # noqa: E402
from train_scripts.device_data import DeviceImages  # noqa: E402
from train_scripts.fast_step import CompileError, FastStage1, FastStage2  # noqa: E402
from train_scripts.history import HistoryBuffer  # noqa: E402
from train_scripts.stages import Stage1, Stage2  # noqa: E402

# dense bf16 tensor-core peak (FLOP/s, no sparsity) by device name fragment; the first match counts
PEAK_BF16 = [('H200', 989e12), ('H100 PCIe', 756e12), ('H100', 989e12), ('A100', 312e12), ('L40S', 362e12),
             ('A10G', 70e12), ('L4', 121e12)]


def peak_flops(ctx) -> tuple:
    if ctx.device.type == 'cuda':
        name = torch.cuda.get_device_name(ctx.device)
        for fragment, peak in PEAK_BF16:
            if fragment in name:
                return name, peak, 'datasheet dense bf16'
    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == 'cuda' else 'cpu'
    return name, bench.conv_peak_flops(ctx), 'one large convolution measured here'


def contexts(args, px: int, batch: int, tmp: str):
    """(reference context, fast context): the same networks' seeds and accelerator; the fast one with the
    device history buffer."""
    ns = types.SimpleNamespace(img_size=px, batch_size=batch, threads=args.threads, device=args.device)
    settings = {} if args.mixed_precision is None else dict(mixed_precision=args.mixed_precision)
    ref, x, precision = bench.build_context(ns, tmp, **settings)
    cfg = ref.cfg
    history = HistoryBuffer(cfg.method.history_batches * batch, cfg.method.history_fraction, enabled=cfg.method.history)
    fast = StepContext(cfg, ref.accelerator, ref.networks, history, ref.totals,
                       generator=ref.networks.create_generator(), channels_last=ref.channels_last)
    return ref, fast, x, precision


def synthetic_images(n: int, size: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)


def make_step(number: int, ctx, x, data: DeviceImages, variant: str, read_every: int = 25):
    """Stage ``number``'s step as ``fn(step)``, seeded per step as the trainer seeds: the reference step on the
    fixed device batch ``x``, or the fast step on its on-device batch; and the stage object."""
    ctx.history.clear()
    if variant == 'reference':
        stage = Stage1(ctx) if number == 1 else Stage2(ctx)
    else:
        stage = (FastStage1 if number == 1 else FastStage2)(ctx, read_every=read_every,
                                                            compile=variant == 'fast_compiled')
    stage.set_modes()

    def run(step):
        torch.manual_seed(derive_seed(ctx.seed, number, step, 0, TAG_TORCH))
        if variant in ('reference', 'fast_fixed_batch'):
            return stage.step(step, x)
        return stage.step(step, ctx.memory_format(data.batch(step)))
    return run, stage


def measure(args, number: int, px: int, batch: int, tmp: str) -> list:
    """Rows of the timing table for one stage, size and batch: reference, fast (and fast compiled), timed in
    ``--rounds`` alternating rounds of ``--iters`` steps after ``--warmup`` steps each (medians over all rounds)."""
    ref_ctx, fast_ctx, x, precision = contexts(args, px, batch, tmp)
    dev = ref_ctx.device
    data = DeviceImages(synthetic_images(max(4 * batch, 64), max(32, px // 2), dev), ref_ctx.cfg.augment, batch, dev,
                        seed=ref_ctx.seed, stage=number)
    name, peak, peak_kind = peak_flops(ref_ctx)
    rows, fns, times, mem, flops = {}, {}, {}, {}, {}
    variants = ['reference', 'fast'] + (['fast_fixed_batch'] if args.fixed_batch else []) + \
        (['fast_compiled'] if args.compile and batch == args.batch else [])  # compiling costs a minute: one batch
    for variant in variants:
        rows[variant] = dict(stage=number, px=px, batch=batch, variant=variant, device=name, precision=precision,
                             channels_last=ref_ctx.channels_last, peak_flops=peak, peak_kind=peak_kind)
        fns[variant], _ = make_step(number, ref_ctx if variant == 'reference' else fast_ctx, x, data, variant)
        try:
            if variant != 'fast_compiled':
                flops[variant] = bench.step_flops(lambda s, _x: fns[variant](s), None, 10 ** 6)
            bench.time_steps(lambda i, _x: fns[variant](10 ** 6 + 1 + i), None, args.warmup, 0, dev)
        except CompileError as e:
            rows[variant]['error'] = str(e)[:500]
            print(f'stage {number} {px}px batch {batch} {variant}: {e}', flush=True)
            del fns[variant]
        times[variant], mem[variant] = [], 0
    for r in range(args.rounds):
        for variant in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            if dev.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(dev)
            times[variant] += bench.time_steps(lambda i, _x: fns[variant](r * args.iters + i), None, 0, args.iters,
                                               dev)
            if dev.type == 'cuda':
                mem[variant] = max(mem[variant], torch.cuda.max_memory_allocated(dev))
    for variant in fns:
        med = statistics.median(times[variant])
        rows[variant].update(img_per_s=batch / med, median_s=med, peak_mem=mem[variant] or None)
        if variant in flops:
            rows[variant].update(gflop_per_image=flops[variant] / batch / 1e9,
                                 fraction_of_peak=flops[variant] / med / peak)
        print(json.dumps(rows[variant]), flush=True)
    fns.clear()
    ref_ctx.accelerator.free_memory()
    return list(rows.values())


def summarise(rows: list) -> list:
    """Per stage and px: the reference at ``baseline_batch`` rows vs the best fast row (any batch)."""
    out = []
    for stage in sorted({r['stage'] for r in rows}):
        for px in sorted({r['px'] for r in rows if r['stage'] == stage}):
            mine = [r for r in rows if r['stage'] == stage and r['px'] == px and 'img_per_s' in r]
            base = [r for r in mine if r['variant'] == 'reference']
            new = [r for r in mine if r['variant'] in ('fast', 'fast_compiled')]  # with their on-device data
            if not base or not new:
                continue
            b = min(base, key=lambda r: r['batch'])  # today's recipe batch
            n = max(new, key=lambda r: r['img_per_s'])
            out.append(dict(stage=stage, px=px, baseline_img_per_s=b['img_per_s'], baseline_batch=b['batch'],
                            new_img_per_s=n['img_per_s'], new_batch=n['batch'], new_variant=n['variant'],
                            ratio=n['img_per_s'] / b['img_per_s'], device=n['device'],
                            peak_mem=n['peak_mem'], fraction_of_peak=n.get('fraction_of_peak')))
    return out


def training_images(args, cfg, batch: int, device) -> tuple:
    """CIFAR-10 decoded onto the device (``--data``), or synthetic images where it is absent (``--smoke``)."""
    if args.data and os.path.isfile(args.data):
        import datasets
        ds = datasets.load_dataset('parquet', data_files=args.data, split='train')
        limit = args.train_images or None
        return DeviceImages.from_dataset(ds, 'image', cfg.augment, batch, device, limit=limit, seed=cfg.run.seed,
                                         stage=1), args.data
    return DeviceImages(synthetic_images(max(args.train_images or 0, 4 * batch), 32, device), cfg.augment, batch,
                        device, seed=cfg.run.seed, stage=1), 'synthetic'


def train_stage(number: int, ctx, data: DeviceImages, seconds: float, steps: int, out: str, log) -> dict:
    """The fast step of stage ``number`` for ``steps`` steps or ``seconds``; metrics every read, snapshots of the
    discriminator at 25 %, 50 % and the end of stage 2."""
    from safetensors.torch import save_file
    ctx.totals[number] = max(1, steps)
    data.stage = number
    run, stage = make_step(number, ctx, None, data, 'fast', read_every=max(1, min(25, steps // 4 or 1)))
    start, step, snaps = time.perf_counter(), 0, {int(steps * 0.25), int(steps * 0.5)}
    os.makedirs(os.path.join(out, 'snapshots'), exist_ok=True)
    while step < steps and time.perf_counter() - start < seconds:
        record = run(step)
        step += 1
        if record is not None:
            record.update(stage=number, step=step, img_per_s=step * data.batch_size / (time.perf_counter() - start))
            log(record)
        if number == 2 and step in snaps:
            save_file({k: v.detach().cpu().contiguous() for k, v in stage.disc.state_dict().items()},
                      os.path.join(out, 'snapshots', f'discriminator_step{step:07d}.safetensors'))
    elapsed = time.perf_counter() - start
    if number == 2:
        save_file({k: v.detach().cpu().contiguous() for k, v in stage.disc.state_dict().items()},
                  os.path.join(out, 'snapshots', f'discriminator_step{step:07d}.safetensors'))
    save_file({k: v.detach().cpu().contiguous() for k, v in ctx.generator.state_dict().items()},
              os.path.join(out, f'damage_repair_generator_stage{number}.safetensors'))
    return dict(stage=number, steps=step, planned_steps=steps, seconds=elapsed,
                img_per_s=step * data.batch_size / max(elapsed, 1e-9))


def train(args, seconds: float, speed: dict, tmp: str) -> list:
    """Stage 1 for 30 % of ``seconds``, stage 2 for the rest, planned from the measured fast img/s (``speed``)."""
    px, batch = args.train_px, args.batch
    _, ctx, _, _ = contexts(args, px, batch, tmp)
    t0 = time.perf_counter()
    data, source = training_images(args, ctx.cfg, batch, ctx.device)
    seconds -= time.perf_counter() - t0
    metrics = open(os.path.join(args.out, 'metrics.jsonl'), 'a', encoding='utf-8')

    def log(record):
        metrics.write(json.dumps(record) + '\n')
        metrics.flush()
    out = []
    for number, share in ((1, 0.3), (2, 0.7)):
        rate = speed.get(number) or 100.0
        steps = args.train_steps or int(seconds * share * rate / batch)
        out.append(dict(train_stage(number, ctx, data, seconds * share, steps, args.out, log), px=px, batch=batch,
                        data=source, data_images=data.n))
        print(json.dumps(out[-1]), flush=True)
    metrics.close()
    return out


def write_report(args, argv, rows: list, trained: list, skipped: list, t0: float) -> dict:
    """``--out``/stage2_speed.json (rewritten after every measurement and at the end)."""
    report = dict(script='benchmarks/gpu/stage2_speed.py', argv=sys.argv[1:] if argv is None else list(argv),
                  torch=torch.__version__, device=rows[0]['device'] if rows else args.device,
                  summary=summarise(rows), results=rows, training=trained, skipped_for_time=skipped,
                  seconds=time.perf_counter() - t0)
    tmp = os.path.join(args.out, 'stage2_speed.json.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(args.out, 'stage2_speed.json'))
    return report


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    p.add_argument('--device', default='cuda' if cuda else 'cpu')
    p.add_argument('--px', default='64,128', help='image sizes timed (comma list)')
    p.add_argument('--batch', type=int, default=512 if cuda else 64, help='fast step batch (and training batch)')
    p.add_argument('--baseline-batch', type=int, default=64, help="today's recipe batch (imagenet.yaml: 64/process)")
    p.add_argument('--iters', type=int, default=10, help='timed steps per variant per round')
    p.add_argument('--rounds', type=int, default=3, help='alternating rounds (medians over all)')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--stages', default='2,1', help='stage 2 first: the budget may skip what comes last')
    p.add_argument('--compile', action='store_true', help='also time the fast step with torch.compile')
    p.add_argument('--fixed-batch', action='store_true', help="also time the fast step on the reference's fixed batch "
                                                               '(the step alone, without its on-device augmentation)')
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--mixed-precision', default=None, choices=('no', 'bf16'),
                   help="default: the trainer's 'auto' (bf16 on GPUs and on CPUs with AMX / AVX512-BF16)")
    p.add_argument('--budget-s', type=float, default=450.0, help='whole run, timing included (leave margin to 8 min)')
    p.add_argument('--train-seconds', type=float, default=None, help='training time (default: what the budget leaves)')
    p.add_argument('--train-px', type=int, default=64)
    p.add_argument('--train-steps', type=int, default=None, help='fixed steps per stage (default: from the speed)')
    p.add_argument('--train-images', type=int, default=None, help='decode only the first N training images')
    p.add_argument('--data', default=os.path.join(os.environ.get('TIMM_SPOT_DATA', os.path.join(_ROOT, '..', 'shared',
                                                                                               'data')),
                                                 'cifar10', 'train.parquet'))
    p.add_argument('--out', default=os.environ.get('OUT', 'runs/stage2_speed'))
    p.add_argument('--smoke', action='store_true', help='CPU, a few steps of everything (tests)')
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.px, args.batch, args.baseline_batch = 'cpu', '32', 4, 4
        args.iters, args.rounds, args.warmup, args.train_px, args.train_steps = 2, 1, 1, 32, 3
        args.train_images, args.threads, args.train_seconds = 16, args.threads or 1, 60.0
    return args


def main(argv=None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    rows, speed, skipped = [], {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for number in [int(s) for s in args.stages.split(',')]:
            for px in [int(v) for v in args.px.split(',')]:
                for batch in sorted({args.baseline_batch, args.batch}):
                    if time.perf_counter() - t0 > 0.75 * args.budget_s:  # keep time for the report and training
                        skipped.append(dict(stage=number, px=px, batch=batch))
                        continue
                    rows += measure(args, number, px, batch, tmp)
                    write_report(args, argv, rows, [], skipped, t0)  # a killed run still leaves its rows
        for r in rows:
            if r['px'] == args.train_px and r['batch'] == args.batch and r['variant'] == 'fast' and 'img_per_s' in r:
                speed[r['stage']] = r['img_per_s']
        seconds = args.train_seconds if args.train_seconds is not None else args.budget_s - (time.perf_counter() - t0)
        trained = train(args, seconds, speed, tmp) if seconds > 0 else []
    report = write_report(args, argv, rows, trained, skipped, t0)
    for s in report['summary']:
        print(f"stage {s['stage']} {s['px']}px: today {s['baseline_img_per_s']:.1f} img/s (batch "
              f"{s['baseline_batch']}), new {s['new_img_per_s']:.1f} img/s (batch {s['new_batch']}, "
              f"{s['new_variant']}): {s['ratio']:.2f}x, fraction of peak {s['fraction_of_peak']}")
    return 0


if __name__ == '__main__':
    sys.exit(main())

#!/usr/bin/env python
"""Images/s of the data path alone for the ImageNet recipe (JPEG photos, 128-px random resized crops), on the
~1,000 ImageNet photos of ``$TIMM_SPOT_DATA/imagenet-samples/samples_160.parquet``:

* ``cpu_1_thread``: the trainer's own CPU path per core: PIL decode (``decode_image``) + ``train_transform``, one thread;
* ``streaming``: the trainer's ``StreamingBatches`` (the imagenet.yaml path: ``streaming: true``, decode + augment in
  ``--workers`` threads) end to end, batch ``--batch``;
* ``device``: the JPEG bytes decoded on ``--device`` (``device_data.decode_jpegs``: nvJPEG on CUDA) and augmented there
  (``augment_batch`` with per-image sizes), batch ``--batch``.

    python benchmarks/loader_speed.py --json benchmarks/results/loader_speed_cpu.json
    python benchmarks/loader_speed.py --device cuda      # on a GPU machine
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from timm_spot.data import decode_image  # noqa: E402
from train_scripts.batches import StreamingBatches, StreamPosition, numpy_rng, open_source, train_transform  # noqa: E402
from train_scripts.config import resolve  # noqa: E402
from train_scripts.device_data import augment_batch, decode_jpegs, device_generator  # noqa: E402

DEFAULT = os.path.join(os.environ.get('TIMM_SPOT_DATA', os.path.join(_ROOT, '..', 'shared', 'data')),
                       'imagenet-samples', 'samples_160.parquet')


def cpu_one_thread(cells, cfg, count: int) -> float:
    torch.set_num_threads(1)
    t = time.perf_counter()
    for i in range(count):
        image = decode_image(cells[i % len(cells)])
        train_transform(image, cfg.augment, numpy_rng(0, 1, i, 0, 0))
    return count / (time.perf_counter() - t)


def streaming(cfg, steps: int) -> float:
    ds = open_source(cfg.data)
    batches = StreamingBatches(ds, cfg, 1, 0, 1, steps + 1, StreamPosition()).iterate(0)
    next(batches)  # the thread pool and the first shuffle buffer
    t = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * cfg.schedule.batch_size / (time.perf_counter() - t)


def on_device(cells, cfg, device, steps: int) -> float:
    b = cfg.schedule.batch_size
    encoded = [c['bytes'] for c in cells]
    aug = dataclasses.replace(cfg.augment)

    def one(step):
        chunk = [encoded[(step * b + j) % len(encoded)] for j in range(b)]
        images, sizes = decode_jpegs(chunk, device)
        return augment_batch(images, aug, device_generator(torch.device(device), 0, 1, step), sizes=sizes)
    one(0)
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for step in range(1, steps + 1):
        one(step)
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    return steps * b / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=DEFAULT)
    p.add_argument('--img-size', type=int, default=128)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--images', type=int, default=300, help='images timed in the one-thread CPU path')
    p.add_argument('--steps', type=int, default=4, help='batches timed in the streaming and device paths')
    p.add_argument('--workers', type=int, default=2, help='streaming: decode/augment threads (num_workers)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--json', default=None)
    args = p.parse_args(argv)
    if not os.path.isfile(args.data):
        print(f'no data at {args.data} (set TIMM_SPOT_DATA)', file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve(dict(data=args.data, img_size=args.img_size, batch_size=args.batch, num_workers=args.workers,
                           output_dir=tmp, dataset_size=1000, shuffle_buffer=256))
        import datasets
        cells = datasets.load_dataset('parquet', data_files=args.data, split='train').cast_column(
            'image', datasets.Image(decode=False))['image']
        out = dict(data=args.data, img_size=args.img_size, batch=args.batch, cpu_count=os.cpu_count(),
                   load_average=os.getloadavg()[0], torch=torch.__version__)
        out['cpu_1_thread_img_per_s'] = cpu_one_thread(cells, cfg, args.images)
        print(f"CPU path, 1 thread: {out['cpu_1_thread_img_per_s']:.0f} img/s", flush=True)
        out['streaming_img_per_s'] = streaming(cfg.replace(streaming=True), args.steps)
        out['streaming_workers'] = args.workers
        print(f"StreamingBatches, {args.workers} threads: {out['streaming_img_per_s']:.0f} img/s", flush=True)
        torch.set_num_threads(1)
        out['device'] = args.device
        out['device_img_per_s'] = on_device(cells, cfg, args.device, args.steps)
        print(f"decode_jpegs + augment_batch on {args.device} (1 thread): {out['device_img_per_s']:.0f} img/s",
              flush=True)
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())

#!/usr/bin/env python
"""The rotation bracket: RotNet (Gidaris et al., ICLR 2018: predict 0/90/180/270 degrees) on the same trunk, images,
size and augmentation as a spot pretraining run, so a probe can say whether the spot recipe or the budget is the
limit.

The network is the pretext discriminator's architecture (``alexnet_spot_discriminator``: the alexnet_spot trunk,
BatchNorm after conv5, fc6 over the conv5 map) with a 4-way head and no mask head; the optimiser is C's (Adam 3e-4,
betas (0.5, 0.999), eps 1e-5, linear decay to 1 %), bf16 autocast and channels-last where the trainer would use them.
The data is the pretraining pipeline itself (``train_scripts.batches``: the config's source, held-out split, crops,
flips and jitter, seeded the same way). Every source image is shown in all four rotations in the same batch.

Budget: ``--images N`` source images (the spot run's images seen), or ``--match-flops GFLOP`` (a spot run's
training FLOPs: ``images x GFLOP/image`` of its stage 2, as ``train_scripts/benchmark.py`` counts them); the FLOPs of
one step here are counted the same way (``FlopCounterMode``). The backbone (BN folded into conv5, the format of a
spot run's ``alexnet_spot.safetensors``) goes to ``--out``; probe it with ``benchmarks/probe_cifar10.py``.

    python benchmarks/rotation_bracket.py --images 16000 --out runs/rotation/alexnet_spot.safetensors

What it needed on this BN-free trunk: with SGD (lr 0.05) and no normalisation conv2-conv5 fell far below random
init; BatchNorm after conv5 (as C has) and C's Adam settings train stably.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import timm_spot  # noqa: E402,F401
from train_scripts import config as config_lib  # noqa: E402
from train_scripts.batches import MapStyleBatches, dataset_length, map_style_loader, open_source  # noqa: E402


def rotations(x: torch.Tensor):
    """[B, C, H, W] -> the four rotations stacked [4B, C, H, W] and their labels 0..3 (k x 90 degrees)."""
    views = torch.cat([torch.rot90(x, k, (2, 3)) for k in range(4)])
    labels = torch.arange(4).repeat_interleave(x.shape[0])
    return views, labels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--config', default=os.path.join(REPO, 'train_scripts', 'configs', 'cifar10_64_release.yaml'))
    p.add_argument('--data', default=None, help="the config's data source unless given")
    p.add_argument('--set', dest='overrides', nargs='*', default=[], metavar='KEY=VALUE')
    p.add_argument('--images', type=int, default=None, help='source images to train on (each in 4 rotations)')
    p.add_argument('--match-flops', type=float, default=None, metavar='GFLOP',
                   help='train until this many GFLOP (instead of --images)')
    p.add_argument('--batch-size', type=int, default=64, help='source images per step (x4 views)')
    p.add_argument('--lr', type=float, default=3e-4)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', required=True, help='backbone safetensors to write')
    p.add_argument('--log-every', type=int, default=25)
    args = p.parse_args(argv)
    if (args.images is None) == (args.match_flops is None):
        p.error('give exactly one of --images and --match-flops')
    torch.set_num_threads(args.threads)

    user = config_lib.load_yaml(args.config)
    user.update(config_lib.parse_overrides(args.overrides))
    user.update(batch_size=args.batch_size, seed=args.seed)
    if args.data:
        user['data'] = args.data
    cfg = config_lib.resolve(user)
    ds = open_source(cfg.data)
    size = cfg.augment.img_size
    torch.manual_seed(args.seed)  # the initialisation and the dropout draws
    model = timm.create_model('alexnet_spot_discriminator', num_classes=4, mask_head=False,
                              head_kernel_size=math.ceil(size / 16)).train()
    # parameters stay contiguous, activations are channels-last (the trainer's layout: step_fn's input)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.999), eps=1e-5)
    use_bf16 = config_lib.cpu_has_fast_bf16()

    def step_fn(x: torch.Tensor) -> torch.Tensor:
        views, labels = rotations(x)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(model.normalize_input(views.contiguous(memory_format=torch.channels_last)))
        loss = F.cross_entropy(logits.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach(), (logits.argmax(1) == labels).float().mean()

    probe_x = torch.zeros(args.batch_size, 3, size, size)
    with FlopCounterMode(display=False) as counter:  # one step's FLOPs, counted like benchmark.py
        views, labels = rotations(probe_x)
        loss = F.cross_entropy(model(model.normalize_input(views)).float(), labels)
        loss.backward()
    opt.zero_grad(set_to_none=True)
    step_gflop = counter.get_total_flops() / 1e9
    steps = math.ceil(args.images / args.batch_size) if args.images else math.ceil(args.match_flops / step_gflop)
    batches = MapStyleBatches(ds, cfg, 2, 0, 1, steps)
    n_images = dataset_length(ds, cfg.data)
    print(f'rotation bracket: {steps} steps x {args.batch_size} images (x4 views) = {steps * args.batch_size} images, '
          f'{steps * step_gflop:.0f} GFLOP ({step_gflop / args.batch_size:.3f} GFLOP/image); data {n_images} images, '
          f'bf16 {use_bf16}', flush=True)
    log = []
    t0 = time.time()
    total_loss = total_acc = 0.0
    for step, (images, _rows, _idx) in enumerate(map_style_loader(batches, 0, cfg.data.num_workers)):
        if step >= steps:
            break
        for g in opt.param_groups:  # linear decay to 1 % (the paper schedule)
            g['lr'] = args.lr * (1 - 0.99 * step / steps)
        loss, acc = step_fn(images)
        total_loss, total_acc = total_loss + float(loss), total_acc + float(acc)
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            n = args.log_every if (step + 1) % args.log_every == 0 else (step + 1) % args.log_every
            rec = {'step': step + 1, 'loss': total_loss / n, 'rot_acc': total_acc / n,
                   'img_per_s': (step + 1) * args.batch_size / (time.time() - t0)}
            log.append(rec)
            print(json.dumps(rec), flush=True)
            total_loss = total_acc = 0.0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    model.eval()
    trunk = set(timm.create_model('alexnet_spot', num_classes=0).state_dict())  # the 4-way fc6/head are pretext-only
    save_file({k: v for k, v in model.backbone_state_dict().items() if k in trunk}, args.out)
    meta = {'command': ' '.join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
            'steps': steps, 'batch_size': args.batch_size, 'images': steps * args.batch_size,
            'gflop': steps * step_gflop, 'gflop_per_image': step_gflop / args.batch_size, 'bf16': use_bf16,
            'seconds': time.time() - t0, 'log': log}
    with open(os.path.splitext(args.out)[0] + '.json', 'w', encoding='utf-8') as f:
        json.dump(meta, f, indent=1)
    print(f'wrote {args.out}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

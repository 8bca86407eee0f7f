#!/usr/bin/env python
"""The shortcut monitor (train_scripts/shortcut.py) on saved weights: can simple cell statistics tell real from
repaired images and find the dropped cells, and how well does C do on the same images?

    python benchmarks/shortcut_check.py --run runs/cifar10_64_release
    python benchmarks/shortcut_check.py --generator hub/damage_repair_generator.spot_c10_64_v2/model.safetensors \\
        --discriminator hub/alexnet_spot_discriminator.spot_c10_64_v2/model.safetensors

The image set and masks are the trainer's monitor set for the config (``--config``, default the release recipe):
``--images`` images spread over the data, masks seeded by ``--seed``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import timm  # noqa: E402
import torch  # noqa: E402

import timm_spot  # noqa: E402,F401
from train_scripts import config as config_lib  # noqa: E402
from train_scripts.batches import open_source  # noqa: E402
from train_scripts.shortcut import ShortcutMonitor  # noqa: E402


def load(name: str, path: str, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--run', default=None, help='a run directory (its generator, discriminator and model_args.json)')
    p.add_argument('--generator', default=None)
    p.add_argument('--discriminator', default=None)
    p.add_argument('--config', default=os.path.join(REPO, 'train_scripts', 'configs', 'cifar10_64_release.yaml'))
    p.add_argument('--data', default=None)
    p.add_argument('--images', type=int, default=256)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--json', default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen_kwargs, disc_kwargs = {}, {}
    if args.run:
        args.generator = args.generator or os.path.join(args.run, 'damage_repair_generator.safetensors')
        args.discriminator = args.discriminator or os.path.join(args.run, 'alexnet_spot_discriminator.safetensors')
        with open(os.path.join(args.run, 'model_args.json'), encoding='utf-8') as f:
            model_args = json.load(f)
        gen_kwargs = model_args.get('damage_repair_generator', {})
        disc_kwargs = model_args.get('alexnet_spot_discriminator', {})
    if not (args.generator and args.discriminator):
        p.error('give --run or both --generator and --discriminator')
    user = config_lib.load_yaml(args.config)
    user['seed'] = args.seed
    if args.data:
        user['data'] = args.data
    cfg = config_lib.resolve(user)
    gen = load('damage_repair_generator', args.generator, **gen_kwargs).float()
    disc = load('alexnet_spot_discriminator', args.discriminator, **disc_kwargs).float()
    gen.set_pretraining_stage(2)
    disc.train()
    monitor = ShortcutMonitor.for_config(open_source(cfg.data), cfg, args.images, args.seed)
    out = monitor(gen, disc, lambda: torch.autocast('cpu', enabled=False))
    out = {k: round(v, 4) for k, v in out.items()}
    out.update(generator=args.generator, discriminator=args.discriminator, images=int(monitor.images.shape[0]))
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, 'w', encoding='utf-8') as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())

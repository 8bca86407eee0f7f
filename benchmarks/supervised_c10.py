#!/usr/bin/env python
"""The supervised upper bracket for the CIFAR-10 probes: ``alexnet_spot`` trained WITH labels on the same images.

Same images and resolution as the self-supervised release (CIFAR-10 training rows without the probe validation
part: the last ``--val-per-class`` images of every class are never trained on), upsampled to ``--img-size``.
Augmentation: 4-px padded random 32-px crop + horizontal flip, then bilinear upsampling; SGD with Nesterov momentum,
cosine learning rate, label smoothing 0.1, bf16 autocast on GPUs. Writes the trunk (no classifier, the
``alexnet_spot`` backbone layout) to ``--out`` so the layerwise probe of benchmarks/probe_cifar10.py gives the
"supervised" row of the paper's Table 4 on the same protocol, and prints the validation accuracy of the trained
classifier itself.

    python benchmarks/supervised_c10.py --out runs/supervised_c10_64/alexnet_spot.safetensors --epochs 30
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def load_cifar(path: str, val_per_class: int):
    """Decoded uint8 images [N, 3, 32, 32] and labels, split into (train, val) by the last rows of each class."""
    import pyarrow.parquet as pq
    from PIL import Image

    table = pq.read_table(path, columns=['image', 'label'])
    images = np.stack([np.asarray(Image.open(io.BytesIO(d['bytes'])).convert('RGB'))
                       for d in table.column('image').to_pylist()])
    labels = np.asarray(table.column('label').to_pylist())
    val = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        val[np.flatnonzero(labels == c)[-val_per_class:]] = True  # the probe's held-out part
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels).long()
    return (x[~val], y[~val]), (x[val], y[val])


def prepare(x: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor, train: bool) -> torch.Tensor:
    x = x.float() / 255.0
    if train:
        b = x.shape[0]
        x = F.pad(x, (4, 4, 4, 4), mode='reflect')
        i, j = torch.randint(0, 9, (2,))
        x = x[:, :, i:i + 32, j:j + 32]
        flip = torch.rand(b, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data', required=True, help='CIFAR-10 train.parquet (image, label)')
    p.add_argument('--out', required=True, help='where to write the backbone safetensors')
    p.add_argument('--img-size', type=int, default=64)
    p.add_argument('--val-per-class', type=int, default=500)
    p.add_argument('--epochs', type=int, default=30)
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--lr', type=float, default=0.05)
    p.add_argument('--weight-decay', type=float, default=5e-4)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default=None)
    args = p.parse_args(argv)

    import timm
    from safetensors.torch import save_file

    import timm_spot  # noqa: F401

    torch.manual_seed(args.seed)
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    (xtr, ytr), (xva, yva) = load_cifar(args.data, args.val_per_class)
    xtr, ytr, xva, yva = xtr.to(device), ytr.to(device), xva.to(device), yva.to(device)
    model = timm.create_model('alexnet_spot', num_classes=int(ytr.max()) + 1).to(device)
    model = model.to(memory_format=torch.channels_last)
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg['mean'], device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg['std'], device=device).view(1, 3, 1, 1)
    steps_per_epoch = len(xtr) // args.batch_size
    total = steps_per_epoch * args.epochs
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.15)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')

    def evaluate(x, y) -> float:
        model.eval()
        correct = 0
        with torch.no_grad(), torch.autocast(**amp):
            for i in range(0, len(x), 1000):
                correct += (model(prepare(x[i:i + 1000], args.img_size, mean, std, False)).argmax(1)
                            == y[i:i + 1000]).sum().item()
        return 100.0 * correct / len(x)

    t0 = time.time()
    history = []
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(xtr), device=device)
        for s in range(steps_per_epoch):
            idx = perm[s * args.batch_size:(s + 1) * args.batch_size]
            with torch.autocast(**amp):
                loss = F.cross_entropy(model(prepare(xtr[idx], args.img_size, mean, std, True)), ytr[idx],
                                       label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            acc = evaluate(xva, yva)
            history.append({'epoch': epoch + 1, 'loss': round(loss.item(), 4), 'val_top1': round(acc, 2)})
            print(f'epoch {epoch + 1}: loss {loss.item():.3f} val top-1 {acc:.2f} % ({time.time() - t0:.0f}s)',
                  flush=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
             if not k.startswith('head.')}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(state, args.out)
    with open(os.path.splitext(args.out)[0] + '.json', 'w') as f:
        json.dump({'args': vars(args), 'history': history, 'seconds': round(time.time() - t0),
                   'device': str(device), 'n_train': len(xtr), 'n_val': len(xva)}, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())

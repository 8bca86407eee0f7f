"""Write a labelled image source as the ``train/`` and ``validation/`` class folders timm's scripts read.

timm's ``train.py`` / ``validate.py`` take ``--data-dir ROOT`` with ``ROOT/train/<class>/*`` and
``ROOT/validation/<class>/*``. This turns any source :func:`timm_spot.data.load_image_source` opens (a Parquet
file, a Hub dataset id, ...) into such a folder: the first ``--train-per-class`` rows of each class go to
``train/``, the LAST ``--val-per-class`` rows of each class (the hold-out of :func:`holdout_split`, never
pretrained on) to ``validation/``::

    python -m timm_spot.data.imagefolder "$TIMM_SPOT_DATA/cifar10/train.parquet" data/cifar10_small \\
        --classes 10 --train-per-class 50 --val-per-class 20
"""
import argparse
import os
import sys
from typing import List, Optional

import numpy as np

from .sources import decode_image, load_image_source

__all__ = ['write_image_folder', 'main']


def write_image_folder(source: str, out: str, classes: Optional[int] = None, train_per_class: int = 50,
                       val_per_class: int = 20, image_column: str = 'image', label_column: str = 'label',
                       split: str = 'train') -> dict:
    """Write ``out/train/<class>/<row>.png`` and ``out/validation/<class>/<row>.png``; returns the counts."""
    ds = load_image_source(source, split=split, image_column=image_column, label_column=label_column)
    labels = np.asarray(ds[label_column])
    names = getattr(ds.features[label_column], 'names', None)
    wanted = sorted(np.unique(labels).tolist())[:classes] if classes else sorted(np.unique(labels).tolist())
    counts = {'train': 0, 'validation': 0}
    for c in wanted:
        rows = np.flatnonzero(labels == c)
        if len(rows) < train_per_class + val_per_class:
            raise ValueError(f'class {c} has {len(rows)} rows, fewer than {train_per_class} + {val_per_class}')
        folder = names[c] if names else f'class{c}'
        for part, picked in (('train', rows[:train_per_class]), ('validation', rows[len(rows) - val_per_class:])):
            target = os.path.join(out, part, folder)
            os.makedirs(target, exist_ok=True)
            for r in picked.tolist():
                image = decode_image(ds[r][image_column])
                if image is None:
                    continue
                image.save(os.path.join(target, f'{r}.png'))
                counts[part] += 1
    return counts


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m timm_spot.data.imagefolder', description=__doc__.split('\n\n')[0])
    p.add_argument('source', help='labelled image source: Parquet/Arrow file(s), a folder or a Hub dataset id')
    p.add_argument('out', help='output folder (gets train/ and validation/)')
    p.add_argument('--classes', type=int, default=None, help='only the first N classes (default: all)')
    p.add_argument('--train-per-class', type=int, default=50, help='training images per class (first rows)')
    p.add_argument('--val-per-class', type=int, default=20, help='validation images per class (last rows)')
    p.add_argument('--image-column', default='image', help='column holding the images (default: image)')
    p.add_argument('--label-column', default='label', help='column holding the labels (default: label)')
    p.add_argument('--split', default='train', help='split of a Hub dataset (default: train)')
    args = p.parse_args(argv)
    counts = write_image_folder(args.source, args.out, args.classes, args.train_per_class, args.val_per_class,
                                args.image_column, args.label_column, args.split)
    print(f"wrote {counts['train']} training and {counts['validation']} validation images to {args.out}")
    return 0


if __name__ == '__main__':
    sys.exit(main())

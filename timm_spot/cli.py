"""``timm-spot`` command line: evaluation, figures and timm's own scripts with the timm-spot models registered.

Subcommands::

    timm-spot probe      layerwise linear probes (paper Tables 4/5) on any labelled dataset
    timm-spot transfer   STL-10 protocol (Table 2): linear on frozen conv5, or full fine-tuning, over folds
    timm-spot figure     filters (Fig. 7a) | neighbors (Fig. 8) | gradcam (Fig. 9)  -> PNG
    timm-spot spot       one image with the discriminator's predicted artifact map overlaid -> PNG
    timm-spot timm-train / timm-validate / timm-inference   run timm's train.py / validate.py / inference.py
    timm-spot hub        export / publish / cache (the repository's ``hub`` tooling: needs a timm-spot checkout)

``timm-spot <subcommand> --help`` lists the options. ``python -m timm_spot.cli`` works without installation.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from typing import List, Optional

__all__ = ['main', 'build_parser', 'default_sample_source', 'default_data_root']

# --img-size range of every command: below 16 px AlexNet's conv/pool stack has no output; above 1024 px the
# figures and feature maps need tens of GB (refused before anything is allocated)
MIN_IMG_SIZE, MAX_IMG_SIZE = 16, 1024


def _kv(items: Optional[List[str]]) -> dict:
    out = {}
    for item in items or []:
        if '=' not in item:
            raise ValueError(f'--model-kwargs expects key=value, got {item!r}')
        k, v = item.split('=', 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def default_data_root() -> Optional[str]:
    """The local real-data folder named by ``$TIMM_SPOT_DATA`` (None when unset or missing)."""
    root = os.environ.get('TIMM_SPOT_DATA')
    return os.path.abspath(root) if root and os.path.isdir(root) else None


def default_sample_source() -> str:
    """``$TIMM_SPOT_DATA/imagenet-samples/samples_160.parquet`` (one ImageNet image per class) when present, else
    the built-in sample photographs."""
    root = default_data_root()
    if root:
        path = os.path.join(root, 'imagenet-samples', 'samples_160.parquet')
        if os.path.isfile(path):
            return path
    return 'builtin'


def _add_model_args(p: argparse.ArgumentParser, default_model: str = 'alexnet_spot') -> None:
    p.add_argument('--model', default=default_model, help=f'timm model name (default: {default_model})')
    p.add_argument('--model-kwargs', nargs='*', metavar='KEY=VALUE', help='extra timm.create_model arguments')
    p.add_argument('--seed', type=int, default=0, help='seed for random init and training (default: 0)')


def _add_discriminator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--model-args', default=None, metavar='JSON|FILE',
                   help='alexnet_spot_discriminator constructor args as a JSON object (e.g. \'{"mask_head": false}\') '
                        'or a run\'s model_args.json (default: the model_args.json beside --weights, if any)')


def _add_data_args(p: argparse.ArgumentParser, img_size: int) -> None:
    p.add_argument('--data', required=True, help='data source: Hub dataset id, image folder, Parquet/Arrow file(s)')
    p.add_argument('--split', default='train', help='split to train on (default: train)')
    p.add_argument('--val-data', default=None, help='separate validation source (default: same as --data)')
    p.add_argument('--val-split', default=None,
                   help='separate validation split (e.g. test); default: hold out --val-per-class rows per class')
    p.add_argument('--image-column', default='image', help='column holding the images (default: image)')
    p.add_argument('--label-column', default='label', help='column holding the integer class labels (default: label)')
    p.add_argument('--num-classes', type=int, default=None,
                   help='expected number of classes (the head size); a different count in the data is an error')
    p.add_argument('--train-per-class', type=int, default=None, help='use only the first N training rows per class')
    p.add_argument('--val-per-class', type=int, default=500,
                   help='held-out validation rows per class (last N of each class; default 500)')
    p.add_argument('--img-size', type=int, default=img_size, help=f'input size in pixels (default {img_size})')
    p.add_argument('--crop-pct', type=float, default=1.0,
                   help='centre-crop fraction at evaluation (default 1.0: whole image; the authors use 0.85)')
    p.add_argument('--batch-size', type=int, default=128,
                   help='images per forward pass of the frozen model when extracting features (default 128; '
                        'memory only, results do not depend on it)')
    p.add_argument('--workers', type=int, default=0, help='DataLoader workers (default 0)')
    p.add_argument('--cache-dir', default=None,
                   help='feature cache folder (default: $TIMM_SPOT_CACHE/features, else '
                        '$XDG_CACHE_HOME/timm_spot/features, else ~/.cache/timm_spot/features); its oldest files '
                        'are deleted beyond $TIMM_SPOT_FEATURE_CACHE_GB (default 2) GB')
    p.add_argument('--no-feature-cache', '--no-cache', dest='no_cache', action='store_true',
                   help='do not read or write cached features (also: TIMM_SPOT_FEATURE_CACHE=0)')
    p.add_argument('--device', default=None, help='torch device (default: cuda if available, else cpu)')


def _add_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument('--epochs', type=int, default=20, help='linear-probe epochs (default 20)')
    p.add_argument('--lr', type=float, default=1e-3, help='linear-probe learning rate (default 1e-3)')
    p.add_argument('--weight-decay', type=float, default=0.1,
                   help='linear-probe L2 weight decay (default 0.1, on standardised features)')
    p.add_argument('--optimizer', choices=('adam', 'adamw', 'sgd'), default='adam',
                   help='linear-probe optimiser (default adam)')
    p.add_argument('--probe-batch-size', type=int, default=256,
                   help='feature vectors per linear-probe training step (default 256)')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='timm-spot', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--threads', type=int, default=None,
                        help='torch intra-op threads (default: one per idle core, i.e. cores minus the 1-minute '
                             'load average, at least 1, as the trainer picks them)')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')

    p = sub.add_parser('probe', help='layerwise linear probes (Tables 4/5)')
    _add_model_args(p)
    p.add_argument('--weights', nargs='*', default=['random'], metavar='FILE',
                   help="weights file(s) (safetensors/pth, backbone or discriminator); 'random' = random init; "
                        'one table row each (default: random)')
    _add_data_args(p, img_size=64)
    _add_probe_args(p)
    p.add_argument('--json', default=None, metavar='FILE', help='also write the results as JSON')

    p = sub.add_parser('transfer', help='STL-10 protocol (Table 2): linear on frozen conv5, or fine-tuning')
    p.add_argument('mode', choices=('linear', 'finetune'),
                   help='linear: a linear classifier on frozen conv5 features (Table 2, "conv1-5 frozen"); '
                        'finetune: train the whole network with fresh fc layers (Table 2, fine-tuned)')
    _add_model_args(p)
    p.add_argument('--weights', default=None, metavar='FILE', help='weights file (default: random init)')
    _add_data_args(p, img_size=96)
    p.add_argument('--folds', default=None,
                   help="fold definition: STL-10's fold_indices.txt (one line of training-row indices per fold) "
                        'or a column holding a fold id per row; default: one train/validation split')
    p.add_argument('--max-folds', type=int, default=None, help='only the first N folds')
    _add_probe_args(p)
    p.add_argument('--ft-epochs', type=int, default=200, help='fine-tuning epochs (paper: 200)')
    p.add_argument('--ft-lr', type=float, default=1e-3, help='fine-tuning Adam learning rate, linear decay')
    p.add_argument('--ft-weight-decay', type=float, default=5e-5, help='fine-tuning weight decay (default 5e-5)')
    p.add_argument('--ft-batch-size', type=int, default=64, help='fine-tuning batch size (default 64)')
    p.add_argument('--color-jitter', action='store_true', help='colour augmentation while fine-tuning')
    p.add_argument('--json', default=None, metavar='FILE', help='also write the results as JSON')

    fig = sub.add_parser('figure', help='figures as PNG: filters | neighbors | gradcam')
    fsub = fig.add_subparsers(dest='figure', metavar='FIGURE')
    p = fsub.add_parser('filters', help='conv1 filters grid (Fig. 7a)')
    _add_model_args(p)
    p.add_argument('--weights', default=None, metavar='FILE',
                   help='backbone or discriminator weights, e.g. hub/alexnet_spot.spot_c10_64/model.safetensors '
                        '(default: random init)')
    p.add_argument('--out', default='conv1_filters.png', help='output PNG (default conv1_filters.png)')
    p.add_argument('--scale', type=int, default=4, help='pixels per filter tap (default 4)')
    p.add_argument('--global-norm', action='store_true', help='one contrast scale for all filters')

    p = fsub.add_parser('neighbors', aliases=['neighbours', 'nn'], help='conv5 nearest neighbours, cosine (Fig. 8)')
    _add_model_args(p)
    p.add_argument('--weights', default=None, metavar='FILE',
                   help='backbone or discriminator weights (default: random init)')
    p.add_argument('--data', default=None,
                   help='image source (default: $TIMM_SPOT_DATA/imagenet-samples/samples_160.parquet when present, '
                        "else scikit-image's built-in photos)")
    p.add_argument('--split', default='train', help='split of --data (default train)')
    p.add_argument('--image-column', default='image', help='column holding the images (default: image)')
    p.add_argument('--caption-column', default=None, help='column printed under each image (default: name/label)')
    p.add_argument('--max-images', type=int, default=1000, help='search among the first N images')
    p.add_argument('--queries', type=int, nargs='*', default=None, help='query row indices (default: random)')
    p.add_argument('--num-queries', type=int, default=6, help='random queries when --queries is not given (default 6)')
    p.add_argument('-k', type=int, default=6, help='neighbours per query')
    p.add_argument('--img-size', type=int, default=128, help='input size in pixels (default 128)')
    p.add_argument('--out', default='neighbors.png', help='output PNG (default neighbors.png)')

    p = fsub.add_parser('gradcam', help='Grad-CAM of the real-vs-corrupt decision (Fig. 9)')
    p.add_argument('images', nargs='*', help='image files (default: --num images from --data)')
    p.add_argument('--weights', default=None, metavar='FILE', help='alexnet_spot_discriminator weights')
    p.add_argument('--data', default=None, help='image source when no files are given (default as neighbors)')
    p.add_argument('--image-column', default='image', help='column holding the images (default: image)')
    p.add_argument('--num', type=int, default=8, help='images drawn at random from --data (default 8)')
    p.add_argument('--img-size', type=int, default=None, help='input size (default: from the weights, else 128)')
    p.add_argument('--target', choices=('predicted', 'real', 'corrupt'), default='predicted',
                   help="class whose evidence is mapped: the discriminator's own decision (default), real or corrupt")
    _add_discriminator_args(p)
    p.add_argument('--seed', type=int, default=0, help='seed of the random image choice and of random init')
    p.add_argument('--out', default='gradcam.png', help='output PNG (default gradcam.png)')

    p = sub.add_parser('spot', help="overlay the discriminator's predicted artifact map on an image")
    p.add_argument('image', help='image file')
    p.add_argument('--weights', default=None, metavar='FILE',
                   help='alexnet_spot_discriminator weights, e.g. '
                        'hub/alexnet_spot_discriminator.spot_c10_64_v2/model.safetensors; without it a randomly '
                        'initialised discriminator is used and the map means nothing (a note says so)')
    p.add_argument('--img-size', type=int, default=None, help='input size (default: from the weights, else 128)')
    p.add_argument('--out', default=None, help='output PNG (default: <image>_spot.png)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random drop mask (--damage) and of random init')
    p.add_argument('--generator', default=None, metavar='FILE',
                   help='damage_repair_generator weights: first pass the image through it, as in pretraining '
                        '(the discriminator learnt "real" = autoencoded, so raw photos look unlike both classes)')
    _add_discriminator_args(p)
    p.add_argument('--damage', action='store_true',
                   help='with --generator: damage and repair the image (random mask, --seed) and score the map '
                        'against the true dropped cells; without it the image is only autoencoded')

    for kind in ('train', 'validate', 'inference'):
        p = sub.add_parser(f'timm-{kind}', help=f"run timm's {kind}.py with the timm-spot models registered",
                           description=f"Runs timm's {kind}.py (from a pytorch-image-models checkout) after "
                                       'importing timm_spot. Arguments after -- go to the script unchanged.')
        p.add_argument('--script', default=None,
                       help=f'path of {kind}.py or of a pytorch-image-models checkout '
                            f'(default: $TIMM_{kind.upper()}_SCRIPT or $TIMM_SCRIPTS_DIR)')
        p.add_argument('script_args', nargs=argparse.REMAINDER, help='-- then the timm script arguments')

    p = sub.add_parser('hub', help='export / publish / cache: python -m hub (needs a timm-spot checkout)',
                       description='Forwards to `python -m hub` (export a run to Hub model folders, publish, seed an '
                                   'offline cache). That tooling lives in the timm-spot repository, not in the wheel: '
                                   'run it from a checkout (or with the checkout on PYTHONPATH).')
    p.add_argument('hub_args', nargs=argparse.REMAINDER, help='arguments of python -m hub')
    return parser


def _cache_dir(args) -> Optional[str]:
    if args.no_cache:
        return None
    from timm_spot.eval.protocols import default_cache_dir

    return args.cache_dir or default_cache_dir()


def _device(args) -> str:
    import torch

    return args.device or ('cuda' if torch.cuda.is_available() else 'cpu')


def _probe_cfg(args):
    from timm_spot.eval.probe import ProbeConfig

    return ProbeConfig(epochs=args.epochs, batch_size=args.probe_batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, optimizer=args.optimizer, seed=args.seed)


def _row_name(model: str, weights: Optional[str]) -> str:
    return f'{model} (random init)' if not weights else f'{model} ({os.path.basename(weights)})'


def cmd_probe(args) -> int:
    from timm_spot.eval.probe import format_table
    from timm_spot.eval.protocols import layerwise_probe

    t0 = time.time()
    rows, results = {}, {}
    for w in args.weights or ['random']:
        weights = None if w in ('random', 'none', '') else w
        res = layerwise_probe(
            model_name=args.model, weights=weights, source=args.data, split=args.split, val_source=args.val_data,
            val_split=args.val_split, image_column=args.image_column, label_column=args.label_column,
            num_classes=args.num_classes, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
            img_size=args.img_size, crop_pct=args.crop_pct, probe=_probe_cfg(args), cache_dir=_cache_dir(args),
            seed=args.seed, batch_size=args.batch_size, workers=args.workers, model_kwargs=_kv(args.model_kwargs),
            device=_device(args))
        rows[_row_name(args.model, weights)] = res
        results[_row_name(args.model, weights)] = res
    print()
    print(f'Linear probes, top-1 % on the validation part ({args.img_size}px):')
    print(format_table(rows))
    meta = next(iter(rows.values()))['_meta']
    print('pooled features: ' + ', '.join(f"{t['name']} {t['grid'][0]}x{t['grid'][1]} ({t['dim']})"
                                          for t in meta.get('taps') or []))
    print(f"{meta['n_train']} training / {meta['n_val']} validation images, {time.time() - t0:.0f}s")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2, default=str)
    return 0


def cmd_transfer(args) -> int:
    from timm_spot.eval.protocols import transfer_eval

    model_kwargs = _kv(args.model_kwargs)
    if args.mode == 'finetune' and args.model.startswith('alexnet_spot') and 'head_type' not in model_kwargs:
        model_kwargs['head_type'] = 'fc'  # paper: AlexNet's FC layers, randomly initialised
    res = transfer_eval(
        mode=args.mode, model_name=args.model, weights=args.weights, source=args.data, split=args.split,
        val_source=args.val_data, val_split=args.val_split, folds=args.folds, image_column=args.image_column,
        label_column=args.label_column, num_classes=args.num_classes, train_per_class=args.train_per_class,
        val_per_class=args.val_per_class, img_size=args.img_size, crop_pct=args.crop_pct, probe=_probe_cfg(args),
        epochs=args.ft_epochs, lr=args.ft_lr, weight_decay=args.ft_weight_decay, ft_batch_size=args.ft_batch_size,
        color_jitter=args.color_jitter, max_folds=args.max_folds, cache_dir=_cache_dir(args), seed=args.seed,
        batch_size=args.batch_size, workers=args.workers, model_kwargs=model_kwargs, device=_device(args))
    what = 'conv1-conv5 frozen + linear' if args.mode == 'linear' else 'conv1-conv5 fine-tuned'
    print()
    print(f"{_row_name(args.model, args.weights)} [{what}]: {res['mean']:.2f}% +- {res['sd']:.2f} "
          f"over {res['n_folds']} fold(s) (per fold: {', '.join(f'{a:.2f}' for a in res['folds'])}), "
          f"{res['n_val']} validation images, {res['seconds']:.0f}s")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(res, f, indent=2, default=str)
    return 0


def _load_images(source: Optional[str], split: str, image_column: str, limit: int, caption_column=None,
                 random_pick: bool = False, seed: int = 0):
    import numpy as np

    from timm_spot.data import decode_image, load_image_source

    source = source or default_sample_source()
    ds = load_image_source(None if source == 'builtin' else source, split=split, image_column=image_column)
    n = len(ds)
    rows = list(range(min(limit, n)))
    if random_pick and n > limit:
        rows = sorted(np.random.default_rng(seed).choice(n, size=limit, replace=False).tolist())
    cap_col = caption_column or next((c for c in ('name', 'label', 'synset') if c in ds.column_names), None)
    images, captions = [], []
    for r in rows:
        item = ds[int(r)]
        im = decode_image(item[image_column])
        if im is None:
            continue
        images.append(im)
        captions.append(str(item[cap_col]) if cap_col else '')
    if not images:
        raise ValueError(f'no readable image in data source {source!r} (column {image_column!r}): check --image-column '
                         f'and that the files are images PIL can read')
    return images, (captions if cap_col else None), source


def cmd_figure(args) -> int:
    from timm_spot.eval import figures
    from timm_spot.eval.features import create_backbone

    if args.figure is None:
        print('error: choose a figure: filters, neighbors or gradcam', file=sys.stderr)
        return 2
    if args.figure == 'filters':
        model = create_backbone(args.model, args.weights, seed=args.seed, **_kv(args.model_kwargs))
        out = figures.filters_figure(model, args.out, scale=args.scale, per_filter=not args.global_norm)
        caption = figures.filters_caption(model, per_filter=not args.global_norm)
        print(f'wrote {out}: ' + ' '.join(caption))
    elif args.figure in ('neighbors', 'neighbours', 'nn'):
        model = create_backbone(args.model, args.weights, seed=args.seed, **_kv(args.model_kwargs))
        images, captions, source = _load_images(args.data, args.split, args.image_column, args.max_images,
                                                args.caption_column)
        out, found = figures.neighbours_figure(model, images, args.out, queries=args.queries,
                                               num_queries=args.num_queries, k=args.k, img_size=args.img_size,
                                               seed=args.seed, captions=captions)
        print(f'wrote {out} ({len(found)} queries among {len(images)} images of {source})')
    elif args.figure == 'gradcam':
        if not args.weights:
            print('note: no --weights given: a randomly initialised discriminator', file=sys.stderr)
        model, img_size = figures.create_discriminator(args.weights, args.img_size, seed=args.seed,
                                                       model_kwargs=figures.parse_model_args(args.model_args))
        if args.images:
            from timm_spot.eval.labelled import open_image

            images = [open_image(p) for p in args.images]
        else:
            images, _, _ = _load_images(args.data, 'train', args.image_column, args.num, random_pick=True,
                                        seed=args.seed)
        out, info = figures.gradcam_figure(model, images, args.out, img_size, target=args.target)
        judged = sum(1 for i in info if i['judged'] == 'real')
        print(f'wrote {out} ({len(info)} images at {img_size}px, {judged} judged real)')
    return 0


def cmd_spot(args) -> int:
    from timm_spot.eval import figures
    from timm_spot.eval.labelled import open_image

    open_image(args.image)  # clear error naming the file before building the model
    if not args.weights:
        print('note: no --weights given: a randomly initialised discriminator (the map is not meaningful)',
              file=sys.stderr)
    model, img_size = figures.create_discriminator(args.weights, args.img_size, seed=args.seed,
                                                   model_kwargs=figures.parse_model_args(args.model_args))
    out = args.out or os.path.splitext(args.image)[0] + '_spot.png'
    image, dropped = None, None
    if args.generator:
        import timm
        gen_args, _ = figures.read_model_args(args.generator, 'damage_repair_generator')
        generator = timm.create_model('damage_repair_generator', pretrained=True,
                                      pretrained_cfg_overlay=dict(file=args.generator), **(gen_args or {})).eval()
        image, dropped = figures.through_generator(generator, open_image(args.image), img_size, args.damage, args.seed)
    elif args.damage:
        raise ValueError('--damage needs --generator FILE (damage_repair_generator weights)')
    caption = None
    if args.generator:
        caption = 'damaged & repaired by the generator' if args.damage else 'autoencoded by the generator'
    out, stats = figures.spot_figure(model, args.image, out, img_size, image=image, dropped=dropped,
                                     image_caption=caption)
    if stats.get('mask_head') is False:
        print(f"wrote {out}: p(real)={stats['p_real']:.3f}; no artifact map: this discriminator has no mask head "
              f"(trained without the mask loss, ablations g/l) ({img_size}px)")
        return 0
    extra = (f", true dropped cells {stats['dropped_cells']}, cell accuracy {stats['cell_accuracy']:.2f}"
             if 'cell_accuracy' in stats else '')
    print(f"wrote {out}: p(real)={stats['p_real']:.3f}, artifact probability mean {stats['artifact_mean']:.3f} "
          f"max {stats['artifact_max']:.3f} ({stats['grid']}x{stats['grid']} cells at {img_size}px){extra}")
    return 0


def cmd_timm(args) -> int:
    from timm_spot.eval.timm_scripts import run_timm_script

    kind = args.command.split('-', 1)[1]
    try:
        return run_timm_script(kind, args.script, args.script_args)
    except FileNotFoundError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


def _find_hub_checkout() -> Optional[str]:
    """The timm-spot checkout holding ``hub/`` (export, publish, cache): the working directory, or the folder
    above an editable install's ``timm_spot``. None for a wheel install."""
    import timm_spot

    for root in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(timm_spot.__file__)))):
        if all(os.path.isfile(os.path.join(root, 'hub', f)) for f in ('__main__.py', 'export.py', 'card.py')):
            return root
    return None


def cmd_hub(args) -> int:
    """``python -m hub`` of the checkout, else a one-line explanation (the tooling is not in the wheel)."""
    root = _find_hub_checkout()
    if root is None:
        print('error: `timm-spot hub` needs a timm-spot checkout (the hub/ export/publish/cache tooling is not in the '
              'wheel): git clone the timm-spot repository and run it from there. Loading released weights needs '
              "no checkout: timm.create_model('hf-hub:timm-spot/<model>.<tag>', pretrained=True) or "
              "'local-dir:DIR' / pretrained_cfg_overlay=dict(file=...).", file=sys.stderr)
        return 2
    if root not in sys.path:
        sys.path.insert(0, root)
    from hub.__main__ import main as hub_main

    hub_args = args.hub_args[1:] if args.hub_args[:1] == ['--'] else args.hub_args
    return hub_main(hub_args) or 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.threads is not None and args.threads < 1:
        print(f'error: --threads must be a positive integer, got {args.threads}', file=sys.stderr)
        return 2
    if args.threads or args.command in ('probe', 'transfer', 'figure', 'spot'):  # timm's scripts: only if asked
        import torch

        from timm_spot.threads import default_threads

        torch.set_num_threads(args.threads or default_threads())
    size = getattr(args, 'img_size', None)
    if size is not None and not MIN_IMG_SIZE <= size <= MAX_IMG_SIZE:
        print(f'error: --img-size must be between {MIN_IMG_SIZE} and {MAX_IMG_SIZE} pixels, got {size}',
              file=sys.stderr)
        return 2
    handlers = {'probe': cmd_probe, 'transfer': cmd_transfer, 'figure': cmd_figure, 'spot': cmd_spot,
                'hub': cmd_hub}
    handler = handlers.get(args.command, cmd_timm)
    try:
        return handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError) as e:  # input mistakes: one line naming the file/option, exit code 2
        print(f'error: {e}', file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())

#!/usr/bin/env python
"""Pretrain alexnet_spot by learning to spot artifacts (Jenni & Favaro, CVPR 2018).

With no arguments this runs the demo (configs/demo.yaml: the built-in scikit-image photos, tiny, both stages,
a few minutes on 2 CPU cores) and writes to runs/demo. The same file runs single-process and distributed:

    python train_scripts/pretrain.py                                   # the demo
    python train_scripts/pretrain.py --config train_scripts/configs/cifar10_64.yaml --max-steps 100
    python train_scripts/pretrain.py --config train_scripts/configs/stl10.yaml --ablation j
    accelerate launch --num_processes 2 train_scripts/pretrain.py --config train_scripts/configs/imagenet.yaml
    python train_scripts/pretrain.py --output-dir runs/demo --resume   # continue a killed run

Outputs (run directory): alexnet_spot.safetensors (transferable backbone), alexnet_spot_discriminator.safetensors,
damage_repair_generator.safetensors (+ _stage1), model_args.json (constructor kwargs for timm.create_model),
config.yaml (resolved), metrics.jsonl, figures/fig3_latest.png (+ stepped copies), checkpoints/ (Accelerate
states, `latest` pointer), tensorboard/ (with --tensorboard).
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ''):
    # run as a script: import the package from the repository root, and do not let train_scripts/ shadow
    # top-level module names (data, config, ...)
    _here = os.path.dirname(os.path.abspath(__file__))
    _root = os.path.dirname(_here)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, _root)

from timm_spot.run_layout import RunLayout  # noqa: E402
from train_scripts import config as config_lib  # noqa: E402

# dedicated flags -> config keys (everything else: --set key=value)
_FLAGS = [
    ('--output-dir', 'output_dir', str, 'run directory'),
    ('--data', 'data', str, 'data source (builtin, folder, parquet glob, Hub id)'),
    ('--image-column', 'image_column', str, 'image column name'),
    ('--img-size', 'img_size', int, 'training crop size (multiple of 16)'),
    ('--batch-size', 'batch_size', int, 'images per process per step'),
    ('--stage1-steps', 'stage1_steps', int, 'stage-1 steps (overrides stage1_epochs)'),
    ('--stage2-steps', 'stage2_steps', int, 'stage-2 steps (overrides stage2_epochs)'),
    ('--stage1-epochs', 'stage1_epochs', float, 'stage-1 epochs'),
    ('--stage2-epochs', 'stage2_epochs', float, 'stage-2 epochs'),
    ('--max-steps', 'max_steps', int, 'stop each stage after this many steps (tests, smoke runs)'),
    ('--theta', 'theta', float, 'drop rate'),
    ('--ablation', 'ablation', str, "Table 1 preset: baseline, a..l"),
    ('--seed', 'seed', int, 'seed'),
    ('--mixed-precision', 'mixed_precision', str, "'auto' (default: bf16 where it is fast), 'no', 'bf16' or 'fp16'"),
    ('--num-workers', 'num_workers', int, 'data-loading workers'),
    ('--log-every', 'log_every', int, 'steps between metric records'),
    ('--figure-every', 'figure_every', int, 'steps between Figure-3 grids'),
    ('--checkpoint-every', 'checkpoint_every', int, 'steps between checkpoints'),
]


def _shipped_configs():
    """The YAML files of train_scripts/configs/, read from the folder so that --help never leaves one out."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')
    return sorted(f for f in os.listdir(folder) if f.endswith(('.yaml', '.yml')))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='pretrain.py',
        description='Self-supervised pretraining by learning to spot artifacts (Jenni & Favaro, CVPR 2018): '
                    'stage 1 trains the autoencoder, stage 2 the repair network against the AlexNet discriminator. '
                    'Without arguments: the demo on built-in photos (configs/demo.yaml -> runs/demo).',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=config_lib.format_keys_help())
    parser.add_argument('--config', default=None,
                        help='YAML config (default: train_scripts/configs/demo.yaml); shipped in '
                             'train_scripts/configs/: ' + ', '.join(_shipped_configs()))
    parser.add_argument('--set', dest='overrides', action='append', nargs='+', default=[], metavar='KEY=VALUE',
                        help='override any config key (value parsed as YAML), repeatable')
    parser.add_argument('--stage', choices=('1', '2', 'both'), default=None, help='stages to run')
    parser.add_argument('--resume', nargs='?', const='latest', default=None, metavar='CHECKPOINT',
                        help='continue from output_dir/checkpoints/latest (or the given checkpoint dir); the saved '
                             'config.yaml of the run is the base, other flags still override it')
    parser.add_argument('--overwrite', action='store_true', default=None,
                        help='start afresh even if the output dir holds a run (checked inputs first; the earlier '
                             'run is renamed to .replaced-* and deleted after the first new checkpoint)')
    parser.add_argument('--tensorboard', action='store_true', default=None, help='log to tensorboard as well')
    parser.add_argument('--no-progress', dest='progress', action='store_false', default=None,
                        help='no tqdm progress bars')
    parser.add_argument('--print-config', action='store_true', help='print the resolved config and exit')
    for flag, key, typ, text in _FLAGS:
        parser.add_argument(flag, dest=key, type=typ, default=None, help=f'{text} (config key {key})')
    return parser


def config_from_args(argv=None):
    """The resolved :class:`~train_scripts.config.PretrainConfig` and the parsed arguments (see --help)."""
    args = build_parser().parse_args(argv)
    explicit = {}
    if args.config is not None:
        explicit.update(config_lib.load_yaml(args.config))
    cli = {}
    for items in args.overrides:
        cli.update(config_lib.parse_overrides(items))
    for key in [k for _, k, _, _ in _FLAGS] + ['stage', 'resume', 'overwrite', 'tensorboard', 'progress']:
        value = getattr(args, key, None)
        if value is not None:
            if key in ('stage1_epochs', 'stage2_epochs') and float(value).is_integer():
                value = int(value)
            cli[key] = value
    base_file = args.config or config_lib.DEMO_CONFIG
    user = dict(config_lib.load_yaml(base_file)) if args.config is None else dict(explicit)
    demo_dir = user.get('output_dir') if args.config is None else None
    user.update(cli)
    cfg = config_lib.resolve(user)
    if cfg.run.resume:
        saved_path = str(RunLayout(cfg.run.output_dir).config)
        if os.path.isfile(saved_path):
            saved = config_lib.load_yaml(saved_path)
            base = dict(config_lib.DEFAULTS)
            base.update({k: v for k, v in saved.items() if k not in config_lib.RUNTIME_KEYS})
            try:
                base = config_lib.PretrainConfig.from_flat(base).to_flat()
            except config_lib.ConfigError as e:
                raise config_lib.ConfigError(f'the saved config {saved_path} of the run to resume: {e}') from None
            again = dict(explicit)
            again.update(cli)
            cfg = config_lib.resolve(again, base=base)
            # refuse a shape change before anything is written (config.yaml stays the resumed run's); the advice
            # names only what the user gave (a flag, a --set, a key of their --config file)
            flags = {k: f for f, k, _, _ in _FLAGS}
            origins = {k: f'{k} in {args.config}' for k in explicit}
            origins.update({k: (f'{flags[k]} {getattr(args, k)}' if getattr(args, k, None) is not None and k in flags
                                else f'--set {k}=...') for k in cli})
            config_lib.check_resume_compatible(base, cfg, saved_path, origins=origins)
    elif demo_dir is not None and cfg.run.output_dir == demo_dir and 'overwrite' not in cli:
        # the demo (no --config) re-run into its own default dir starts afresh; any other --output-dir is guarded
        cfg = cfg.replace(overwrite=True)
    return cfg, args


def resume_command(argv=None) -> str:
    """The command that resumes this invocation: its own options (only those the user passed), without
    --overwrite, with --resume."""
    import shlex
    args = list(sys.argv[1:] if argv is None else argv)
    args = [a for a in args if a != '--overwrite']
    if not any(a == '--resume' or a.startswith('--resume=') for a in args):
        args.append('--resume')
    return 'python train_scripts/pretrain.py ' + ' '.join(shlex.quote(a) for a in args)


def _input_errors():
    from train_scripts.checkpoint import CheckpointError

    return (config_lib.ConfigError, CheckpointError, FileExistsError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError, ValueError)


def main(argv=None) -> int:
    """Exit codes: 0 done; 2 an input error (one line naming the option or file, the value and the fix);
    3 a non-finite loss; 4 the disk is full (the last good checkpoint is kept)."""
    try:
        cfg, args = config_from_args(argv)
    except (config_lib.ConfigError, FileNotFoundError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if args.print_config:
        print(config_lib.dump_yaml(cfg))
        return 0
    # lazy: --help, --print-config and config errors answer without loading torch and Accelerate
    from train_scripts.checkpoint import DiskFullError, disk_full_message, is_disk_full, read_latest
    from train_scripts.optim import NonFiniteLossError
    from train_scripts.trainer import Pretrainer

    try:
        Pretrainer(cfg).run()
    except KeyboardInterrupt:
        out = os.path.abspath(cfg.run.output_dir)
        kept = read_latest(str(RunLayout(out).checkpoints))
        where = f'the last checkpoint is {kept}' if kept else 'no checkpoint had been written yet'
        how = f'continue with: {resume_command(argv)}' if kept else 'start it again'
        print(f'interrupted: {where}; {how}', file=sys.stderr, flush=True)
        return 130
    except NonFiniteLossError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 3
    except DiskFullError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 4
    except OSError as e:
        if not is_disk_full(e):
            if isinstance(e, _input_errors()):
                print(f'error: {e}', file=sys.stderr, flush=True)
                return 2
            raise
        out = os.path.abspath(cfg.run.output_dir)
        kept = read_latest(str(RunLayout(out).checkpoints))
        print(f'error: {disk_full_message("the outputs", out, kept)} ({e})', file=sys.stderr, flush=True)
        return 4
    except RuntimeError as e:
        if not is_disk_full(e):
            raise
        out = os.path.abspath(cfg.run.output_dir)
        kept = read_latest(str(RunLayout(out).checkpoints))
        print(f'error: {disk_full_message("the outputs", out, kept)}', file=sys.stderr, flush=True)
        return 4
    except _input_errors() as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())

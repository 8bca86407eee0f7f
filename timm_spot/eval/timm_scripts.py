"""Run timm's own ``train.py`` / ``validate.py`` / ``inference.py`` with the timm-spot models registered.

Those scripts live in timm's GitHub repository (huggingface/pytorch-image-models), not in the ``timm`` wheel, and
are not part of this project. This wrapper imports :mod:`timm_spot` (registering ``alexnet_spot`` and friends with
timm's model registry) and then executes the given script with :mod:`runpy` as ``__main__``, passing the remaining
arguments through unchanged::

    python -m timm_spot.eval.timm_scripts train /path/to/pytorch-image-models/train.py -- \\
        --data-dir /data/imagefolder --model alexnet_spot --num-classes 10 \\
        --pretrained --pretrained-path alexnet_spot.safetensors --img-size 96 --epochs 200

    timm-spot timm-train --script /path/to/pytorch-image-models/train.py -- --model alexnet_spot ...

The script path may also come from ``TIMM_TRAIN_SCRIPT`` / ``TIMM_VALIDATE_SCRIPT`` / ``TIMM_INFERENCE_SCRIPT`` or
from ``TIMM_SCRIPTS_DIR`` (a pytorch-image-models checkout). Distributed: ``torchrun --nproc_per_node=N -m
timm_spot.eval.timm_scripts train /path/train.py -- ...``.
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import List, Optional, Sequence

__all__ = ['SCRIPTS', 'find_script', 'run_timm_script', 'main']

SCRIPTS = {'train': 'train.py', 'validate': 'validate.py', 'inference': 'inference.py'}


def find_script(kind: str, script: Optional[str] = None) -> str:
    """Path of timm's ``<kind>.py``: ``script`` if given, else ``TIMM_<KIND>_SCRIPT``, else ``TIMM_SCRIPTS_DIR``."""
    if kind not in SCRIPTS:
        raise ValueError(f'unknown timm script {kind!r}; one of {sorted(SCRIPTS)}')
    env = f'TIMM_{kind.upper()}_SCRIPT'
    candidates = []
    if script:
        candidates.append(os.path.join(script, SCRIPTS[kind]) if os.path.isdir(script) else script)
    elif os.environ.get(env):
        candidates.append(os.environ[env])
    elif os.environ.get('TIMM_SCRIPTS_DIR'):
        candidates.append(os.path.join(os.environ['TIMM_SCRIPTS_DIR'], SCRIPTS[kind]))
    if not candidates:
        raise FileNotFoundError(
            f"timm's {SCRIPTS[kind]} is not in the timm wheel: clone https://github.com/huggingface/"
            f'pytorch-image-models and pass its path (--script PATH), or set {env} or TIMM_SCRIPTS_DIR')
    path = os.path.abspath(os.path.expanduser(candidates[0]))
    if not os.path.isfile(path):
        raise FileNotFoundError(f'timm script {path!r} does not exist (from {"argument" if script else env})')
    return path


def run_timm_script(kind: str, script: Optional[str], args: Sequence[str]) -> int:
    """Import timm_spot, then run ``script`` as ``__main__`` with ``sys.argv = [script, *args]``; return exit code."""
    import timm_spot  # noqa: F401  (registers alexnet_spot, alexnet_spot_discriminator, ... with timm)

    path = find_script(kind, script)
    args = list(args)
    if args and args[0] == '--':
        args = args[1:]
    saved_argv, saved_path = list(sys.argv), list(sys.path)
    sys.argv = [path] + args
    sys.path.insert(0, os.path.dirname(path))
    try:
        runpy.run_path(path, run_name='__main__')
    except SystemExit as e:  # argparse --help / errors, explicit sys.exit in the script
        code = e.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ('usage: python -m timm_spot.eval.timm_scripts {train,validate,inference} [SCRIPT] -- [timm args]\n'
             '  SCRIPT: path of timm\'s script (or a pytorch-image-models checkout); default from TIMM_<KIND>_SCRIPT '
             'or TIMM_SCRIPTS_DIR')
    if not argv or argv[0] in ('-h', '--help') or argv[0] not in SCRIPTS:
        print(usage, file=sys.stderr)
        return 0 if argv and argv[0] in ('-h', '--help') else 2
    kind, rest = argv[0], argv[1:]
    script = None
    if rest and rest[0] != '--' and not rest[0].startswith('-'):
        script, rest = rest[0], rest[1:]
    try:
        return run_timm_script(kind, script, rest)
    except FileNotFoundError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())

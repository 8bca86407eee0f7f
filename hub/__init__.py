"""Hugging Face Hub tooling of timm-spot: export a pretraining run as Hub model folders, publish them, and build an
offline Hugging Face cache from them.

Command line (from the repository root)::

    python -m hub export RUN_DIR --tag TAG [--models alexnet_spot,...] [--results results.json]
    python -m hub publish hub/<model>.<tag> --repo-id timm-spot/<model>.<tag> [--dry-run] [--revision main]
    python -m hub cache --all --cache-dir DIR          # every shipped release, for HF_HUB_OFFLINE=1
    python -m hub cache hub/<model>.<tag> [--repo-id ID] [--cache-dir DIR] [--commit SHA]

Release folders live in ``hub/<model>.<tag>/``, named like their Hub repo ``timm-spot/<model>.<tag>``, and hold
exactly the files of that repo. ``timm_spot/models/_releases.py`` lists them (one row per released model and tag;
the first row of a model is its default tag); ``tests/test_releases.py`` checks that the table and the folders
agree, so every tag timm lists as pretrained has weights in the repository.

Adding a release (e.g. all three models of a run as ``spot_c10_64_v2``)::

    # 1. rows in timm_spot/models/_releases.py, newest first (they become the default tags):
    #      Release('alexnet_spot', 'spot_c10_64_v2', 64), Release('alexnet_spot_discriminator', ...), ...
    # 2. the folders (backbone float32; discriminator and generator bfloat16, output-checked):
    python -m hub export runs/<run> --tag spot_c10_64_v2 --results results.json --dataset uoft-cs/cifar10
    # 3. the check, then commit the rows and the folders together:
    python -m pytest tests/test_releases.py
"""
from .cache import build_offline_cache, offline_env, repo_cache_folder, shipped_releases, verify_offline_cache

__all__ = [
    'build_offline_cache', 'verify_offline_cache', 'repo_cache_folder', 'offline_env', 'shipped_releases',
    'export_run', 'export_model', 'load_run', 'publish_folder', 'check_folder',
]


def __getattr__(name):  # torch/timm are imported only by the commands that need them
    if name in ('export_run', 'export_model', 'load_run'):
        from . import export
        return getattr(export, name)
    if name in ('publish_folder', 'check_folder'):
        from . import publish
        return getattr(publish, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

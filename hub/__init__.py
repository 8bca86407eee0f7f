"""Hugging Face Hub tooling of timm-spot: export a pretraining run as Hub model folders, publish them, and build an
offline Hugging Face cache from them.

Command line (from the repository root)::

    python -m hub export RUN_DIR --out hub/ [--models alexnet_spot,...] [--results results.json]
    python -m hub publish hub/alexnet_spot --repo-id timm-spot/alexnet_spot.spot_in1k [--dry-run] [--revision main]
    python -m hub cache hub/alexnet_spot --repo-id timm-spot/alexnet_spot.spot_in1k [--cache-dir DIR] [--commit SHA]

Exported folders live in ``hub/<model_name>/`` and hold exactly the files of the Hub repo.
"""
from .cache import build_offline_cache, offline_env, repo_cache_folder, verify_offline_cache

__all__ = [
    'build_offline_cache', 'verify_offline_cache', 'repo_cache_folder', 'offline_env',
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

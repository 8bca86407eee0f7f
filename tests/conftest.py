"""Shared test fixtures: where the project's real data lives, and small deterministic settings.

Real data (CIFAR-10 and ImageNet sample images as Parquet) is read from ONE place: ``$TIMM_SPOT_DATA``, default
``<repo>/../shared/data``; tests that need it skip with the path and this variable in the reason.
"""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get('TIMM_SPOT_DATA') or REPO.parent / 'shared' / 'data')
SHARED_DATA = DATA_ROOT  # older name
CIFAR10 = DATA_ROOT / 'cifar10' / 'train.parquet'
IMAGENET_SAMPLES = DATA_ROOT / 'imagenet-samples' / 'samples_160.parquet'

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def cifar10_path() -> Path:
    if not CIFAR10.exists():
        pytest.skip(f'real data not found at {CIFAR10} (set TIMM_SPOT_DATA to the data folder)')
    return CIFAR10


@pytest.fixture
def imagenet_samples_path() -> Path:
    if not IMAGENET_SAMPLES.exists():
        pytest.skip(f'real data not found at {IMAGENET_SAMPLES} (set TIMM_SPOT_DATA to the data folder)')
    return IMAGENET_SAMPLES


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Accelerate keeps its precision in a process-wide singleton: tests that build trainers with different
    ``mixed_precision`` settings in one process would otherwise clash ('AcceleratorState has already been
    initialized')."""
    yield
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover
        return
    AcceleratorState._reset_state(True)

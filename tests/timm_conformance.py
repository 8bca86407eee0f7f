"""Locate (or fetch from the package index) timm's own ``tests/test_models.py`` for the installed timm.

timm ships its model test-suite in the sdist, not in the wheel. ``python tests/timm_conformance.py`` (run by
``.ci/run``) downloads the sdist of exactly the installed version with pip and unpacks ``tests/`` into
``tests/.timm_tests/`` (git-ignored). ``load_timm_test_models()`` imports that file *after* timm_spot is
imported, so its ``list_models()`` parametrisation sees our models.
"""
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Optional

import timm

CACHE = Path(__file__).resolve().parent / '.timm_tests'


def timm_tests_dir() -> Path:
    override = os.environ.get('TIMM_TESTS_DIR')
    return Path(override) if override else CACHE / f'timm-{timm.__version__}' / 'tests'


def fetch_timm_tests() -> Path:
    """Download the timm sdist matching the installed version (package index only) and unpack its tests."""
    target = timm_tests_dir()
    if (target / 'test_models.py').exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
             f'timm=={timm.__version__}', '-d', tmp],
            check=True,
        )
        sdist = next(Path(tmp).glob('timm-*.tar.gz'))
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if '/tests/' in m.name and m.isfile()]
            tar.extractall(CACHE, members=members, filter='data')
    if not (target / 'test_models.py').exists():
        raise FileNotFoundError(f'timm {timm.__version__} sdist has no tests/test_models.py')
    return target


def load_timm_test_models() -> Optional[ModuleType]:
    """Import timm's test_models.py as a module (None when it is not available locally)."""
    path = timm_tests_dir() / 'test_models.py'
    if not path.exists():
        try:  # only the package index is contacted
            fetch_timm_tests()
        except Exception as e:  # offline: the caller skips (or fails in CI) with the reason
            print(f'could not fetch the timm test-suite: {e}', file=sys.stderr)
            return None
    import timm_spot  # noqa: F401  (register before timm's module-level list_models() calls)
    spec = importlib.util.spec_from_file_location('timm_test_models', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == '__main__':
    print(fetch_timm_tests())

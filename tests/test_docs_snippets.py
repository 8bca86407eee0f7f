"""Every command a user pastes from the docs runs as written.

* Every fenced ``python`` block of README.md, MODEL_CARD.md and every shipped Hub card (``hub/*/README.md``) runs
  unchanged in a fresh interpreter, offline (``HF_HUB_OFFLINE=1``), from a Hugging Face cache seeded exactly as CI
  seeds it (``python -m hub cache --all``), in the repository root.
* Every command of README.md's ``bash`` blocks runs in order in one scratch folder (``HOME`` points there too), so
  runs, image folders, figures and caches land there and nothing in the repository is written; ``hub/`` is
  copied there, as ``python -m hub`` writes beside itself. Long commands get the short-run flags of
  :data:`SHORT_RUN` appended (argparse: the last value wins), e.g. ``--max-steps 2`` for pretraining.
* Commands that need what CI lacks are skipped by :data:`SKIP` (a named reason each), or when they need
  ``$TIMM_SPOT_DATA`` / ``$TIMM_SCRIPTS_DIR`` and those are absent (the reason says which).

Deselect with ``-m "not docs"``; the default ``python -m pytest`` (what CI runs) includes them.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DATA_ROOT, REPO

pytestmark = [pytest.mark.docs, pytest.mark.slow]

SCRIPTS_DIR = Path(os.environ.get('TIMM_SCRIPTS_DIR') or REPO.parent / 'shared' / 'timm-scripts')
HAVE_DATA = (DATA_ROOT / 'cifar10' / 'train.parquet').is_file()
HAVE_SCRIPTS = (SCRIPTS_DIR / 'train.py').is_file()

# (substring of the command, reason): what the test does not run. Keep it short and honest.
SKIP = [
    ('pip install', 'installs packages from the network (CI runs it as its set-up step)'),
    ('python -m pytest', 'the test suite itself (this test is part of it)'),
    ('stl10.yaml', 'downloads STL-10 from the Hugging Face Hub (no network in CI); offline it fails at once '
                   '(tests/test_docs_snippets.py::test_hub_dataset_offline_fails_fast)'),
    ('--num_processes 8', 'needs 8 GPUs'),
    ('for mp in bf16 no', 'GPU timing run (2 x 300 steps at 128 px, batch 128, 12 workers)'),
]

# (regex on the command, flags appended): short runs of the long commands
SHORT_RUN = [
    (r'train_scripts/pretrain\.py', '--max-steps 2 --num-workers 0 --figure-every 0'),
    (r'benchmarks/probe_cifar10\.py', '--train-per-class 10 --val-per-class 5 --epochs 1 --no-cache'),
    (r'timm-spot (--threads \d+ )?(probe|transfer linear)', '--train-per-class 10 --val-per-class 5 --epochs 1'),
    (r'timm-spot (--threads \d+ )?transfer finetune', '--train-per-class 5 --val-per-class 3 --ft-epochs 1 --epochs 1'),
    (r'timm-spot (--threads \d+ )?figure neighbors', '--max-images 24'),
    (r'timm_spot\.data\.imagefolder', '--train-per-class 6 --val-per-class 3'),
    (r'\$TIMM_SCRIPTS_DIR/train\.py', '--epochs 2 -b 16'),
]

FENCE = re.compile(r'^```(\w*)\n(.*?)^```', re.M | re.S)


def _blocks(path: Path, lang: str):
    text = path.read_text(encoding='utf-8')
    for m in FENCE.finditer(text):
        if m.group(1) == lang:
            yield text[:m.start()].count('\n') + 1, m.group(2)


def _doc_files():
    return [REPO / 'README.md', REPO / 'MODEL_CARD.md'] + sorted(REPO.glob('hub/*/README.md'))


PYTHON_BLOCKS = [pytest.param(code, id=f'{p.relative_to(REPO)}:{line}')
                 for p in _doc_files() for line, code in _blocks(p, 'python')]


def _strip_comment(line: str) -> str:
    """``line`` without its trailing shell comment (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in '\'"':
            quote = ch
        elif ch == '#' and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def _commands(block: str):
    """The block's commands: continuation lines joined, comments dropped (so appended flags are not commented
    out)."""
    joined, cur = [], ''
    for line in block.splitlines():
        line = _strip_comment(line)
        if line.rstrip().endswith('\\'):
            cur += line.rstrip()[:-1] + ' '
            continue
        cur += line
        if cur.strip():
            joined.append(cur.strip())
        cur = ''
    return [re.sub(r'\s+', ' ', c) for c in joined]


def test_comment_stripping():
    assert _commands("a --x 'it # is' \\\n    --y \"q's\"   # the run's recipe\nb # c\n# only\n") == \
        ["a --x 'it # is' --y \"q's\"", 'b']


def _bash_commands():
    out, seen = [], set()
    for line, block in _blocks(REPO / 'README.md', 'bash'):
        assigns = []
        for cmd in _commands(block):
            if re.fullmatch(r'\w+=\S+', cmd):  # W=hub/...: kept for the block's later commands
                assigns.append(cmd)
                continue
            if cmd in seen:  # the demo command appears twice: one run
                continue
            seen.add(cmd)
            out.append(pytest.param('\n'.join(assigns + [cmd]), id=f'README.md:{line}:{cmd[:60]}'))
    return out


BASH_COMMANDS = _bash_commands()


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', PYTHONDONTWRITEBYTECODE='1',
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    env.pop('GITHUB_ACTIONS', None)
    if HAVE_DATA:
        env['TIMM_SPOT_DATA'] = str(DATA_ROOT)
    if HAVE_SCRIPTS:
        env['TIMM_SCRIPTS_DIR'] = str(SCRIPTS_DIR)
    env.update(extra)
    return env


@pytest.fixture(scope='session')
def seeded_hf_cache(tmp_path_factory):
    """A Hugging Face cache with every shipped release, made as CI makes it."""
    cache = tmp_path_factory.mktemp('docs_hf') / 'hub'
    r = subprocess.run([sys.executable, '-m', 'hub', 'cache', '--all', '--cache-dir', str(cache)], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return cache


@pytest.fixture(scope='module')
def scratch(tmp_path_factory):
    """The folder README's commands run in: the repository's code by symlink, ``hub/`` copied."""
    work = tmp_path_factory.mktemp('docs_bash')
    for name in ('timm_spot', 'train_scripts', 'benchmarks', 'pyproject.toml'):
        (work / name).symlink_to(REPO / name)
    shutil.copytree(REPO / 'hub', work / 'hub', ignore=shutil.ignore_patterns('__pycache__', '.*'))
    (work / 'home').mkdir()
    return work


def _run(args, cwd, env, timeout=600):
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout[-3000:] + '\n--- stderr ---\n' + r.stderr[-5000:]


def test_docs_have_snippets():
    """The collection below is not silently empty: README has Python and bash blocks, every card a Python one."""
    assert sum(1 for p in PYTHON_BLOCKS if p.id.startswith('README.md')) >= 1
    cards = sorted(REPO.glob('hub/*/README.md'))
    assert cards and all(any(p.id.startswith(str(c.relative_to(REPO))) for p in PYTHON_BLOCKS) for c in cards)
    assert len(BASH_COMMANDS) >= 20


@pytest.mark.parametrize('code', PYTHON_BLOCKS)
def test_python_block_runs_as_written(code, seeded_hf_cache, tmp_path):
    rc, out = _run([sys.executable, '-c', code], REPO, _env(HF_HUB_CACHE=str(seeded_hf_cache),
                                                            HOME=str(tmp_path)))
    assert rc == 0, out


@pytest.mark.parametrize('script', BASH_COMMANDS)
def test_readme_command_runs(script, scratch, seeded_hf_cache):
    cmd = script.splitlines()[-1]
    for needle, reason in SKIP:
        if needle in cmd:
            pytest.skip(reason)
    if 'TIMM_SPOT_DATA' in cmd or 'probe_cifar10.py' in cmd:
        if not HAVE_DATA:
            pytest.skip(f'needs the real data ($TIMM_SPOT_DATA; not found at {DATA_ROOT})')
    if 'TIMM_SCRIPTS_DIR' in cmd and not HAVE_SCRIPTS:
        pytest.skip(f"needs timm's train.py / validate.py ($TIMM_SCRIPTS_DIR; not found at {SCRIPTS_DIR})")
    for pattern, flags in SHORT_RUN:
        if re.search(pattern, cmd):
            cmd += ' ' + flags
    script = '\n'.join(script.splitlines()[:-1] + ['set -e', cmd])
    rc, out = _run(['bash', '-c', script], scratch, _env(HOME=str(scratch / 'home')), timeout=240)
    assert rc == 0, f'{cmd}\n{out}'


def test_shipped_cards_are_publishable():
    """Cards name no run folder, local data path or uncommitted tree, state a license, and carry a pipeline tag only
    where the model's forward() does what the pipeline promises."""
    sys.path.insert(0, str(REPO))
    from hub.card import split_front_matter
    want = {'alexnet_spot': 'image-feature-extraction', 'alexnet_spot_discriminator': 'image-classification',
            'damage_repair_generator': None}
    for card in sorted(REPO.glob('hub/*/README.md')):
        front, body = split_front_matter(card.read_text(encoding='utf-8'))
        arch = card.parent.name.split('.')[0]
        assert front.get('license') == 'mit' and '**License:**' in body, card
        assert front.get('pipeline_tag') == want[arch], card
        for bad in ('**Run:**', '-dirty', 'local:', '$TIMM_SPOT_DATA', 'x_in_minus1_to_1', '# img: a PIL image'):
            assert bad not in body, (card, bad)


def test_hub_dataset_offline_fails_fast(tmp_path):
    """README's STL-10 command downloads its data: offline it stops at once with one line naming the dataset."""
    out = tmp_path / 'stl'
    r = subprocess.run([sys.executable, str(REPO / 'train_scripts' / 'pretrain.py'), '--config',
                        str(REPO / 'train_scripts' / 'configs' / 'stl10.yaml'), '--ablation', 'j', '--output-dir',
                        str(out)], cwd=tmp_path, env=_env(HF_HUB_CACHE=str(tmp_path / 'hf'), HF_DATASETS_CACHE=str(
                            tmp_path / 'ds'), HOME=str(tmp_path)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "'tanganke/stl10'" in lines[0] and 'must be downloaded' in lines[0], r.stderr
    assert 'HF_HUB_OFFLINE' in lines[0] and not out.exists()

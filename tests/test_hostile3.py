"""Issue 22 (hostile input round 3): no path out of a folder, no glob in an upload, one process per run dir, every
config checked before work starts, an integrity record for the final weights, and one clear line per mistake."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import timm
import timm_spot  # noqa: F401
from test_faults import _hub_folder, finished_run, master_run, snapshot, tiny_config  # noqa: F401  (fixtures)
from train_scripts.pretrain import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


class CommitApi:
    """HfApi stand-in that records the commit operations (no network)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        return type('R', (), {'repo_id': repo_id})()

    def create_branch(self, repo_id, **kw):
        self.calls.append(('create_branch', kw))

    def create_commit(self, **kw):
        self.calls.append(('create_commit', kw))
        return type('C', (), {'oid': 'b' * 40, 'commit_url': 'u', 'pr_url': None})()

    def upload_folder(self, **kw):
        raise AssertionError('upload_folder turns file names into glob patterns: never used')


# ------------------------------------------------------------------------------------------------ 1. publish
def test_publish_commits_exactly_the_listed_files_even_with_glob_names(tmp_path, capsys):
    from hub.publish import publish_folder

    folder = _hub_folder(tmp_path)
    (folder / '.env').write_text('HF_TOKEN=secret')
    (folder / '*').write_text('a file named star')
    (folder / '[.]env').write_text('a file named [.]env')
    api = CommitApi()
    summary = publish_folder(folder, 'someone/alexnet_spot.test', api=api)
    (kind, kw), = api.calls
    ops = kw['operations']
    sent = {op.path_in_repo: op.path_or_fileobj for op in ops}
    assert sorted(sent) == sorted(f['path'] for f in summary['files'])
    assert '*' in sent and '[.]env' in sent and '.env' not in sent
    assert sent['[.]env'] == str(folder / '[.]env')  # itself, not .env
    assert all(Path(p).read_bytes() != b'HF_TOKEN=secret' for p in sent.values())
    # the dry run lists the same files
    capsys.readouterr()
    dry = publish_folder(folder, 'someone/alexnet_spot.test', dry_run=True)
    assert sorted(f['path'] for f in dry['files']) == sorted(sent)
    out = capsys.readouterr().out
    assert '[.]env' in out and '.env ' not in out.replace('[.]env', '')


def test_publish_refuses_a_symlink_out_of_the_folder(tmp_path):
    from hub.publish import publish_folder

    folder = _hub_folder(tmp_path)
    secret = tmp_path / 'secret.txt'
    secret.write_text('HF_TOKEN=secret')
    (folder / 'notes.txt').symlink_to(secret)
    api = CommitApi()
    for dry_run in (True, False):
        with pytest.raises(ValueError, match=r'notes\.txt is a symlink'):
            publish_folder(folder, 'someone/alexnet_spot.test', api=api, dry_run=dry_run, log=None)
    assert api.calls == []

"""Build a Hugging Face Hub cache from an exported model folder, for machines that cannot reach the Hub.

``huggingface_hub`` (and so ``timm.create_model(..., pretrained=True)`` and ``hf-hub:`` names) reads a repo from
its cache without any network once ``HF_HUB_OFFLINE=1`` is set. The layout it reads is::

    <cache>/models--<owner>--<name>/
        blobs/<sha256 for LFS files | git blob sha1 otherwise>     the file contents
        snapshots/<commit>/<path in repo> -> ../../blobs/<id>       relative symlinks (copies where links fail)
        refs/<branch>                                               the commit hash, no trailing newline

``build_offline_cache`` writes exactly that for one exported folder, so an offline cluster can use the weights
before (or instead of) publishing them, or with a copy of the published files. ``--all`` caches every shipped
release folder ``hub/<model>.<tag>/`` as repo ``timm-spot/<model>.<tag>``::

    python -m hub cache --all --cache-dir ~/hf-offline/hub
    HF_HUB_CACHE=~/hf-offline/hub HF_HUB_OFFLINE=1 python -c \
        "import timm, timm_spot; timm.create_model('alexnet_spot', pretrained=True)"

When the commit of the published repo is known (``python -m hub publish`` prints it), pass it as ``commit`` so that
pinned ids (``hf_hub_id='owner/name@<commit>'`` or ``hf-hub:owner/name@<commit>``) resolve from this cache too.
Without it a synthetic commit hash is derived from the files (stable: same files, same hash).
"""
import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional

from ._files import PathLike, blob_id, git_blob_sha1, list_repo_files, file_sha256

__all__ = ['build_offline_cache', 'verify_offline_cache', 'repo_cache_folder', 'offline_env', 'shipped_releases',
           'HUB_DIR']

HUB_DIR = Path(__file__).resolve().parent

_COMMIT_RE = re.compile(r'^[0-9a-f]{40}$')
_REPO_ID_RE = re.compile(r'^[A-Za-z0-9][\w.\-]*/[\w.\-]+$')


def repo_cache_folder(cache_dir: PathLike, repo_id: str, repo_type: str = 'model') -> Path:
    """``<cache>/models--owner--name`` (huggingface_hub's ``repo_folder_name``)."""
    return Path(cache_dir) / '--'.join([f'{repo_type}s', *repo_id.split('/')])


def _synthetic_commit(entries: List[tuple]) -> str:
    h = hashlib.sha1(b'timm-spot offline cache\n')
    for rel, bid in entries:
        h.update(f'{rel}\0{bid}\n'.encode())
    return h.hexdigest()


def _place_blob(src: Path, dst: Path) -> None:
    if dst.exists() and dst.stat().st_size == src.stat().st_size and _blob_ok(dst):
        return
    tmp = dst.with_name(dst.name + '.incomplete')
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _blob_ok(blob: Path) -> bool:
    name = blob.name
    if len(name) == 64:
        return file_sha256(blob) == name
    if len(name) == 40:
        return git_blob_sha1(blob) == name
    return False


def _link(pointer: Path, blob: Path, mode: str) -> None:
    if pointer.is_symlink() or pointer.exists():
        pointer.unlink()
    pointer.parent.mkdir(parents=True, exist_ok=True)
    if mode == 'symlink':
        try:
            os.symlink(os.path.relpath(blob, pointer.parent), pointer)
            return
        except OSError:  # no symlinks here (Windows without developer mode): huggingface_hub copies too
            pass
    shutil.copyfile(blob, pointer)


def build_offline_cache(
        export_dir: PathLike,
        repo_id: str,
        cache_dir: PathLike,
        commit: Optional[str] = None,
        ref: Optional[str] = 'main',
        link: str = 'symlink',
) -> Path:
    """Put the files of ``export_dir`` into ``cache_dir`` as huggingface_hub caches repo ``repo_id``.

    Args:
        export_dir: an exported model folder (``python -m hub export``): config.json, model.safetensors, README.md...
        repo_id: the Hub repo id the files stand for, e.g. ``timm-spot/alexnet_spot.spot_c10_64``.
        cache_dir: the hub cache root (what ``HF_HUB_CACHE`` points at; default ``~/.cache/huggingface/hub``).
        commit: 40-hex commit hash of the snapshot (the published commit, so pinned ids resolve); default: a
            synthetic hash of the files.
        ref: branch or tag name to point at the snapshot (``refs/<ref>``); ``None`` writes no ref (only pinned
            ``@<commit>`` loads then find it).
        link: ``'symlink'`` (as huggingface_hub does) or ``'copy'`` (snapshot files are copies of the blobs).

    Returns:
        ``cache_dir`` (as a Path).
    """
    export_dir = Path(export_dir)
    cache_dir = Path(cache_dir)
    if not _REPO_ID_RE.match(repo_id):
        raise ValueError(f"repo_id must look like 'owner/name', got {repo_id!r}")
    if link not in ('symlink', 'copy'):
        raise ValueError(f"link must be 'symlink' or 'copy', got {link!r}")
    files = list_repo_files(export_dir)
    if not files:
        raise FileNotFoundError(f'no files to cache in {export_dir}')
    if not (export_dir / 'config.json').is_file():
        raise FileNotFoundError(f'{export_dir} has no config.json: not an exported timm model folder')
    if commit is not None:
        commit = commit.lower()
        if not _COMMIT_RE.match(commit):
            raise ValueError(f'commit must be a 40-character hex commit hash, got {commit!r}')

    entries = [(rel, blob_id(p)) for rel, p in files]
    commit = commit or _synthetic_commit(entries)
    storage = repo_cache_folder(cache_dir, repo_id)
    blobs = storage / 'blobs'
    snapshot = storage / 'snapshots' / commit
    blobs.mkdir(parents=True, exist_ok=True)
    if snapshot.exists():  # rebuilding the same commit: drop files that are no longer part of it
        shutil.rmtree(snapshot)
    snapshot.mkdir(parents=True)
    for (rel, src), (_, bid) in zip(files, entries):
        blob = blobs / bid
        _place_blob(src, blob)
        _link(snapshot.joinpath(*rel.split('/')), blob, link)
    if ref:
        if _COMMIT_RE.match(ref):
            raise ValueError(f'ref must be a branch or tag name, not a commit hash: {ref!r}')
        ref_file = storage / 'refs' / Path(*ref.split('/'))
        ref_file.parent.mkdir(parents=True, exist_ok=True)
        ref_file.write_text(commit)  # no trailing newline: huggingface_hub reads the file verbatim
    return cache_dir


def verify_offline_cache(cache_dir: PathLike, repo_id: str, revision: str = 'main') -> List[str]:
    """Problems found in a cached repo snapshot (empty list: all good).

    Checks that the revision resolves, every snapshot file resolves to a blob, and every blob's content matches its
    name (sha256 or git sha1). huggingface_hub does not re-hash cached files, so a flipped byte inside the tensor
    data would otherwise load silently.
    """
    storage = repo_cache_folder(cache_dir, repo_id)
    if not storage.is_dir():
        return [f'{repo_id}: not in cache {cache_dir} (no {storage.name})']
    commit = revision
    if not _COMMIT_RE.match(revision):
        ref_file = storage / 'refs' / Path(*revision.split('/'))
        if not ref_file.is_file():
            return [f'{repo_id}: no ref {revision!r} in {storage}']
        commit = ref_file.read_text()
        if not _COMMIT_RE.match(commit):
            return [f'{repo_id}: ref {revision!r} holds {commit!r}, not a commit hash (a trailing newline?)']
    snapshot = storage / 'snapshots' / commit
    if not snapshot.is_dir():
        return [f'{repo_id}@{revision}: snapshot {commit} missing']
    problems = []
    for rel, p in list_repo_files(snapshot):
        if p.is_symlink():
            target = p.resolve()
            if not target.is_file():
                problems.append(f'{repo_id}@{revision}: {rel} links to a missing blob {os.readlink(p)}')
                continue
            if target.parent != (storage / 'blobs').resolve():
                problems.append(f'{repo_id}@{revision}: {rel} links outside the blobs folder')
            if not _blob_ok(target):
                problems.append(f'{repo_id}@{revision}: {rel}: blob {target.name} does not match its content '
                                f'(corrupted or truncated)')
        elif not (storage / 'blobs' / blob_id(p)).is_file():  # a copied snapshot file: its blob must match it
            problems.append(f'{repo_id}@{revision}: {rel} matches no blob (corrupted, truncated or edited)')
    if not (snapshot / 'config.json').exists():
        problems.append(f'{repo_id}@{revision}: no config.json')
    return problems


def shipped_releases(hub_dir: PathLike = HUB_DIR) -> List[tuple]:
    """(folder, repo id, pinned commit or None) of every release folder ``<model>.<tag>/`` in ``hub_dir``.

    A release folder is named like its Hub repo and holds a config.json; the repo id is ``timm-spot/<folder>`` and
    the commit is the revision pinned in timm_spot's release table (None until published and pinned).
    """
    try:
        from timm_spot.models._releases import HUB_OWNER, RELEASES
        pinned = {r.name: r.revision for r in RELEASES}
    except ImportError:  # hub/ used without the package: no pins
        HUB_OWNER, pinned = 'timm-spot', {}
    out = []
    for folder in sorted(Path(hub_dir).iterdir()):
        if folder.is_dir() and '.' in folder.name and not folder.name.startswith('.') and \
                (folder / 'config.json').is_file():
            out.append((folder, f'{HUB_OWNER}/{folder.name}', pinned.get(folder.name)))
    return out


def offline_env(cache_dir: PathLike) -> dict:
    """The environment variables that make huggingface_hub (and timm) read only this cache."""
    return {'HF_HUB_CACHE': str(Path(cache_dir).resolve()), 'HF_HUB_OFFLINE': '1'}

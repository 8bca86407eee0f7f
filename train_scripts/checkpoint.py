"""Crash-safe files and resumable checkpoints.

* Files (weights, config, metrics, figures, the ``latest`` pointer) are written to a temporary name in the same
  directory, flushed and fsynced, then ``os.replace``d over the target: a kill at any point leaves either the old
  or the new complete file, never a truncated one.
* A checkpoint is ``accelerator.save_state`` into ``checkpoints/.tmp-<name>``, fsynced and renamed to
  ``checkpoints/<name>`` (``stage<s>_step<n>``); ``checkpoints/latest`` (JSON) is updated last. Resume reads
  ``latest`` and ignores ``.tmp-*`` leftovers.
* Beside Accelerate's files, saved and loaded explicitly: ``rank_state_<r>.pt``, each process's own state (history
  buffer, stream position, metric sums), and ``frozen_<name>.safetensors``, modules Accelerate did not prepare
  (the frozen autoencoder). The position (stage, step) is in ``meta.json``.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from timm_spot.hashing import file_sha256

LATEST = 'latest'
META = 'meta.json'
_NAME_RE = re.compile(r'^stage(\d+)_step(\d+)$')


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (corrupt, incomplete, incompatible); the message names it."""


class RunLockedError(FileExistsError):
    """Another process runs in the run directory (holds its lock); the message names its pid."""


class RunLock:
    """Exclusive lock (``fcntl.lockf``) on ``<run dir>/.lock`` (the file holds the holder's pid), taken before the
    output dir is checked and held to the end of the run: two processes in one --output-dir would interleave
    metrics.jsonl and overwrite each other's weights, and a concurrent --overwrite would move a live run aside. The
    kernel drops the lock when the process dies, so a killed run never leaves a stale lock. A POSIX lock, not
    ``flock``: forked DataLoader workers do not inherit it, so workers orphaned by a SIGKILL do not keep it.

    A run dir that does not exist yet is created to hold the lock; :meth:`release` removes the lock file, and the
    dir again when it is still empty (a run refused before writing anything leaves nothing behind).
    """

    def __init__(self, out: str) -> None:
        import fcntl
        self.out = out
        self.path = os.path.join(out, '.lock')
        if os.path.exists(out) and not os.path.isdir(out):
            raise NotADirectoryError(f'--output-dir {out} is a file, not a folder: choose another --output-dir')
        self.created = not os.path.exists(out)
        try:
            os.makedirs(out, exist_ok=True)
            while True:
                f = open(self.path, 'a+', encoding='utf-8')
                try:
                    fcntl.lockf(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno not in (errno.EACCES, errno.EAGAIN):
                        raise
                    f.seek(0)
                    holder = f.read().strip() or 'unknown'
                    f.close()
                    raise RunLockedError(
                        f'{out} is in use by another pretraining process (pid {holder}, lock {self.path}): wait for '
                        f'it to finish or stop it, or choose another --output-dir') from None
                try:  # the holder before us may have removed the file: lock the one at the path
                    same = os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                f.close()
            f.seek(0)
            f.truncate()
            f.write(f'{os.getpid()}\n')
            f.flush()
        except RunLockedError:
            raise
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise PermissionError(f'cannot write to --output-dir {out} ({e.strerror}): choose a writable folder '
                                      f'with --output-dir') from None
            if isinstance(e, (FileExistsError, NotADirectoryError)):
                raise NotADirectoryError(f'--output-dir {out}: a part of the path is a file, not a folder '
                                         f'({e.strerror}): choose another --output-dir') from None
            raise
        self.file = f

    def release(self) -> None:
        if self.file is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        self.file.close()
        self.file = None
        if self.created:
            try:
                os.rmdir(self.out)  # only when empty
            except OSError:
                pass


class DiskFullError(OSError):
    """Writing an output failed because the disk is full; the message names the space and the kept checkpoint."""


# ----------------------------------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------------------------------

def fsync_path(path: str) -> None:
    """fsync a file or a directory (directories: best effort, not supported everywhere)."""
    flags = os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, writer: Callable[[str], None]) -> None:
    """Write ``path`` atomically: ``writer(tmp_path)`` writes the content to a temporary file in the same
    directory, which is fsynced and renamed over ``path``. On error the temporary file is removed and ``path``
    keeps its previous content."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}')
    try:
        writer(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_path(directory)


def atomic_write_bytes(path: str, data: bytes) -> None:
    def writer(tmp: str) -> None:
        with open(tmp, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, writer)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode('utf-8'))


def atomic_save_safetensors(state_dict: Dict[str, Any], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """``safetensors.torch.save_file`` of contiguous CPU copies, atomically."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {'format': 'pt'}))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint directories
# ----------------------------------------------------------------------------------------------------------------

def checkpoint_name(stage: int, step: int) -> str:
    return f'stage{stage}_step{step:07d}'


def parse_checkpoint_name(name: str) -> Optional[Tuple[int, int]]:
    m = _NAME_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def list_checkpoints(root: str) -> List[Tuple[int, int, str]]:
    """Complete checkpoints under ``root`` as (stage, step, path), oldest first."""
    out = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            parsed = parse_checkpoint_name(name)
            if parsed and os.path.isfile(os.path.join(root, name, 'meta.json')):
                out.append((parsed[0], parsed[1], os.path.join(root, name)))
    return sorted(out)


def read_latest(root: str) -> Optional[str]:
    """The checkpoint ``latest`` points to (falling back to the newest complete one), or None."""
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        try:
            with open(pointer, 'r', encoding='utf-8') as f:
                name = json.load(f)['name']
            path = os.path.join(root, name)
            if os.path.isfile(os.path.join(path, 'meta.json')):
                return path
        except (ValueError, KeyError, OSError):
            pass
    found = list_checkpoints(root)
    return found[-1][2] if found else None


def read_meta(path: str) -> Dict[str, Any]:
    meta_file = os.path.join(path, 'meta.json')
    if not os.path.isfile(meta_file):
        raise FileNotFoundError(f'{path} is not a complete checkpoint (no meta.json)')
    with open(meta_file, 'r', encoding='utf-8') as f:
        return json.load(f)


def checkpoint_digests(path: str) -> Dict[str, str]:
    """sha256 of every file of a checkpoint directory (relative posix paths), ``meta.json`` excluded."""
    out = {}
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, path).replace(os.sep, '/')
            if rel != META:
                out[rel] = file_sha256(full)
    return dict(sorted(out.items()))


def _readable_problem(path: str) -> Optional[str]:
    """Structural check of one checkpoint file that needs no checksum: safetensors header and data length,
    torch zip archives' CRCs. None when it looks intact (plain pickles cannot be checked without unpickling)."""
    name = os.path.basename(path)
    try:
        if name.endswith('.safetensors'):
            size = os.path.getsize(path)
            with open(path, 'rb') as f:
                raw = f.read(8)
                if len(raw) != 8:
                    return 'shorter than 8 bytes'
                n = int.from_bytes(raw, 'little')
                if n > size - 8:
                    return f'truncated (header length {n}, file size {size})'
                header = json.loads(f.read(n).decode('utf-8'))
            end = max((v['data_offsets'][1] for k, v in header.items() if k != '__metadata__'), default=0)
            if 8 + n + end != size:
                return f'truncated or padded ({size} bytes, the header says {8 + n + end})'
        elif name.endswith(('.bin', '.pt')) and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                return f'corrupt (CRC mismatch in {bad})'
        elif name.endswith(('.bin', '.pt')):
            return 'not a torch.save archive (truncated?)'
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, EOFError) as e:
        return f'unreadable ({type(e).__name__}: {e})'
    return None


def verify_checkpoint(path: str) -> Optional[str]:
    """Why ``path`` cannot be resumed from ('file X: ...'), or None when it is complete and intact.

    Checkpoints written by this version carry the sha256 of each file in ``meta.json`` (``files``); each file is
    re-hashed. Older ones without checksums get the structural checks of :func:`_readable_problem`.
    """
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        return f'{META}: {e}'
    files = meta.get('files')
    if isinstance(files, dict):
        for rel, digest in files.items():
            full = os.path.join(path, *rel.split('/'))
            if not os.path.isfile(full):
                return f'file {rel} is missing'
            try:
                actual = file_sha256(full)
            except OSError as e:
                return f'file {rel} is unreadable: {e}'
            if actual != digest:
                return f'file {rel} does not match its sha256 in {META} (corrupt or modified)'
        return None
    for dirpath, _, names in os.walk(path):
        for name in sorted(names):
            problem = _readable_problem(os.path.join(dirpath, name))
            if problem:
                return f'file {os.path.relpath(os.path.join(dirpath, name), path)} is {problem}'
    return None


def find_resume_checkpoint(root: str, requested: str,
                           log: Optional[Callable[[str], None]] = None) -> Tuple[str, List[Tuple[str, str]]]:
    """The checkpoint to resume from and the (path, reason) of the newer ones skipped as corrupt.

    ``requested == 'latest'``: the newest complete checkpoint under ``root`` that verifies (the ``latest`` pointer
    first), falling back to older ones. A given directory must verify itself (no fallback).
    """
    if requested != 'latest':
        path = os.path.abspath(requested)
        if not os.path.isdir(path):
            raise CheckpointError(f'--resume: checkpoint {requested} does not exist')
        problem = verify_checkpoint(path)
        if problem:
            raise CheckpointError(f'--resume: checkpoint {path} cannot be resumed from: {problem}')
        return path, []
    candidates = [p for _, _, p in reversed(list_checkpoints(root))]
    pointed = read_latest(root)
    if pointed is not None and pointed in candidates:
        candidates.remove(pointed)
        candidates.insert(0, pointed)
    if not candidates:
        raise CheckpointError(f'--resume: no checkpoint in {root} (nothing to resume; start without --resume)')
    skipped: List[Tuple[str, str]] = []
    for path in candidates:
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
        if log is not None:
            log(f'warning: skipping checkpoint {path}: {problem}')
    raise CheckpointError('--resume: no intact checkpoint in ' + root + ': ' +
                          '; '.join(f'{os.path.basename(p)}: {why}' for p, why in skipped))


def is_disk_full(exc: BaseException, directory: Optional[str] = None, needed: int = 0) -> bool:
    """Whether ``exc`` (or its cause) is a full disk: ENOSPC/EDQUOT, torch's zip writer 'unexpected pos' error,
    or less free space in ``directory`` than ``needed`` bytes."""
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, 'EDQUOT', -1)):
            return True
        text = str(e)
        if 'No space left' in text or 'unexpected pos' in text or 'Disk quota' in text:
            return True
        e = e.__cause__ or e.__context__
    if directory is not None:
        try:
            free = shutil.disk_usage(directory).free
        except OSError:
            return False
        return free < max(needed, 1 << 20)
    return False


def dir_size(path: Optional[str]) -> int:
    total = 0
    if path and os.path.isdir(path):
        for dirpath, _, files in os.walk(path):
            for name in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, name))
                except OSError:
                    pass
    return total


def disk_full_message(what: str, directory: str, kept: Optional[str]) -> str:
    try:
        free = shutil.disk_usage(directory).free
        space = f'{free / 2 ** 20:.1f} MiB free'
    except OSError:
        space = 'free space unknown'
    keep = (f'the last good checkpoint {kept} is kept: free disk space (or lower keep_checkpoints) and resume '
            f'with --resume') if kept else 'no checkpoint had been written yet: free disk space and start again'
    return f'no space left on the disk of {directory} ({space}) while writing {what}; {keep}'


def clean_partial(root: str) -> None:
    """Remove ``.tmp-*`` checkpoint directories left by a killed save (main process only)."""
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.startswith('.tmp-'):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _fsync_tree(path: str) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            fsync_path(os.path.join(dirpath, f))
        fsync_path(dirpath)


PROCESS_STATE = 'rank_state_{rank}.pt'
FROZEN = 'frozen_{name}.safetensors'


def save_checkpoint(accelerator, root: str, stage: int, step: int, keep: int, meta: Dict[str, Any],
                    process_state: Dict[str, Any], frozen: Dict[str, Any]) -> str:
    """Write checkpoint ``stage<s>_step<n>`` (all processes call): ``accelerator.save_state`` (prepared models,
    optimizers, RNG states), this process's ``process_state`` (:func:`save_process_state`), the ``frozen`` modules
    (not prepared by Accelerate: main process, safetensors) and ``meta.json`` (stage, step, checksums), into a
    temporary dir renamed into place; then ``latest`` is updated and old checkpoints beyond ``keep`` deleted."""
    name = checkpoint_name(stage, step)
    final = os.path.join(root, name)
    tmp = os.path.join(root, f'.tmp-{name}')
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        save_process_state(tmp, accelerator.process_index, process_state)
        if accelerator.is_main_process:
            for module_name, module in frozen.items():
                save_frozen(tmp, module_name, module)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint only takes space
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            with open(os.path.join(tmp, META), 'w', encoding='utf-8') as f:
                json.dump(dict(meta, stage=stage, step=step, world_size=accelerator.num_processes,
                               files=checkpoint_digests(tmp)), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.exists(final):  # a checkpoint of a killed run that `latest` never pointed to
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)
        atomic_write_text(os.path.join(root, LATEST), json.dumps({'name': name, 'stage': stage, 'step': step}))
        for _, _, old in list_checkpoints(root)[:-keep]:
            if os.path.abspath(old) != os.path.abspath(final):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# ----------------------------------------------------------------------------------------------------------------
# What Accelerate does not save: per-process state and frozen modules
# ----------------------------------------------------------------------------------------------------------------

def save_process_state(directory: str, rank: int, state: Dict[str, Any]) -> None:
    """One process's state (history buffer, stream position, metric sums: plain tensors, numbers, lists), saved by
    every process itself (Accelerate saves custom objects from the main process only)."""
    with open(os.path.join(directory, PROCESS_STATE.format(rank=rank)), 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def load_process_state(directory: str, rank: int) -> Dict[str, Any]:
    """The state :func:`save_process_state` wrote, with ``weights_only=True``: it never runs code from the file."""
    path = os.path.join(directory, PROCESS_STATE.format(rank=rank))
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001  (truncated file, or one holding objects beyond tensors)
        raise CheckpointError(f'checkpoint {directory}: cannot load {os.path.basename(path)}: '
                              f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None


def save_frozen(directory: str, name: str, module) -> None:
    """A module that is not trained in this stage (so not prepared by Accelerate), e.g. the frozen autoencoder."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, os.path.join(directory, FROZEN.format(name=name)))


def load_frozen(directory: str, name: str, module) -> None:
    """Load :func:`save_frozen`'s file into ``module`` (strict: a mismatch names the checkpoint)."""
    path = os.path.join(directory, FROZEN.format(name=name))
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {directory} lacks {os.path.basename(path)} (the frozen {name}); it was '
                              f'written by another version or another configuration')
    try:
        module.load_state_dict(load_file(path, device='cpu'))
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f'checkpoint {directory}: {os.path.basename(path)} does not fit the {name}: '
                              f'{str(e).strip().splitlines()[0][:300]}') from None

"""Crash-safe files and resumable checkpoints.

* Files (weights, config, metrics, figures, the ``latest`` pointer) are written to a temporary name in the same
  directory, flushed and fsynced, then ``os.replace``d over the target: a kill at any point leaves either the old
  or the new complete file, never a truncated one.
* A checkpoint is ``accelerator.save_state`` into ``checkpoints/.tmp-<name>``, fsynced and renamed to
  ``checkpoints/<name>`` (``stage<s>_step<n>``); ``checkpoints/latest`` (JSON) is updated last. Resume reads
  ``latest`` and ignores ``.tmp-*`` leftovers.
* :class:`RunState` is registered with ``accelerator.register_for_checkpointing``: the global position (stage,
  step) and frozen modules go into Accelerate's ``custom_checkpoint_*.pkl``; per-process state (history buffer,
  stream position, metric accumulators) goes into ``rank_state_<r>.pt`` beside it, because Accelerate saves
  custom objects from the main process only.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

CHECKPOINT_DIR = 'checkpoints'
LATEST = 'latest'
_NAME_RE = re.compile(r'^stage(\d+)_step(\d+)$')


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
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {'format': 'pt'}))


def atomic_torch_save(obj: Any, path: str) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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


def save_checkpoint(accelerator, run_state: 'RunState', root: str, stage: int, step: int, keep: int,
                    meta: Dict[str, Any]) -> str:
    """``accelerator.save_state`` into a temporary dir, then rename and update ``latest`` (all processes call)."""
    name = checkpoint_name(stage, step)
    final = os.path.join(root, name)
    tmp = os.path.join(root, f'.tmp-{name}')
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    run_state.stage, run_state.step = stage, step
    run_state.save_dir = tmp
    try:
        accelerator.save_state(tmp)
    finally:
        run_state.save_dir = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, 'meta.json'), 'w', encoding='utf-8') as f:
            json.dump(dict(meta, stage=stage, step=step, world_size=accelerator.num_processes), f, indent=1)
        _fsync_tree(tmp)
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
# The registered checkpoint object
# ----------------------------------------------------------------------------------------------------------------

class RunState:
    """Position of the run plus everything that is not a prepared model/optimizer (see module doc)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.stage, self.step = 1, 0
        self.local: Dict[str, Any] = {}  # name -> object with state_dict() / load_state_dict(): per process
        self.frozen: Dict[str, Any] = {}  # name -> nn.Module not prepared by Accelerate (saved by the main process)
        self.device = None
        self.save_dir: Optional[str] = None
        self.load_dir: Optional[str] = None

    def state_dict(self) -> Dict[str, Any]:
        import torch

        if self.save_dir is None:
            raise RuntimeError('RunState.state_dict() is only called through save_checkpoint()')
        local = {name: obj.state_dict() for name, obj in self.local.items()}
        path = os.path.join(self.save_dir, f'rank_state_{self.rank}.pt')
        with open(path, 'wb') as f:
            torch.save(local, f)
            f.flush()
            os.fsync(f.fileno())
        return {
            'format': 1, 'stage': self.stage, 'step': self.step, 'world_size': self.world,
            'frozen': {name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                       for name, m in self.frozen.items()},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        import torch

        if self.load_dir is None:
            raise RuntimeError('RunState.load_state_dict() is only called through the trainer\'s resume')
        if int(state['world_size']) != self.world:
            raise RuntimeError(f"checkpoint was written by {state['world_size']} processes, this run has {self.world}; "
                               f'resume with the same number of processes')
        self.stage, self.step = int(state['stage']), int(state['step'])
        for name, module in self.frozen.items():
            if name in state['frozen']:
                module.load_state_dict(state['frozen'][name])
        path = os.path.join(self.load_dir, f'rank_state_{self.rank}.pt')
        local = torch.load(path, map_location='cpu', weights_only=False)
        for name, obj in self.local.items():
            if name in local:
                if name == 'history':
                    obj.load_state_dict(local[name], device=self.device)
                else:
                    obj.load_state_dict(local[name])

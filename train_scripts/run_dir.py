"""The run directory's lifecycle: its lock, the decision between a fresh start and a resume, an earlier run set
aside by ``--overwrite`` (deleted after the first checkpoint), config.yaml and config_history.jsonl, and
metrics.jsonl cut back to the checkpoint a run resumes from."""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from timm_spot.run_layout import RunLayout

from . import config as config_lib
from .checkpoint import (RunLock, RunLockedError, atomic_write_text, clean_partial, find_resume_checkpoint,
                         read_meta)
from .config import PretrainConfig
from .networks import check_stage1_file, generator_needed_from_stage1, stage1_file


class RunDirectory:
    """``cfg.run.output_dir`` for one run: locked from before the output check to the end of the run."""

    def __init__(self, cfg: PretrainConfig, layout: RunLayout, accelerator, log: Callable[[str], None]) -> None:
        self.cfg, self.layout, self.accelerator, self.log = cfg, layout, accelerator, log
        self.out = str(layout.root)
        self.is_main, self.world = accelerator.is_main_process, accelerator.num_processes
        self.set_aside: Optional[str] = None
        self.lock: Optional[RunLock] = None
        self.lock_taken = False

    # ------------------------------------------------------------------ the lock
    def acquire_lock(self) -> None:
        """The run dir's exclusive lock (:class:`RunLock`), taken by the main process; every process raises when it
        is held by another run."""
        if self.lock_taken:  # every rank, not only the holder: the broadcast below must pair up across ranks
            return
        error: Optional[BaseException] = None
        if self.is_main:
            try:
                self.lock = RunLock(self.out)
            except OSError as e:
                error = e
        if self.world > 1:
            from accelerate.utils import broadcast_object_list
            message = [str(error) if error is not None else None]
            broadcast_object_list(message)
            if message[0] is not None and error is None:
                raise RunLockedError(message[0])
        if error is not None:
            raise error
        self.lock_taken = True

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        self.lock_taken = False

    # ------------------------------------------------------------------ fresh start or resume
    def earlier_outputs(self) -> List[str]:
        """Names of an earlier run's outputs present in the output dir; empty when it holds nothing of value (no
        weights, checkpoints, figures or metric records: a config.yaml alone is that of a run that produced
        nothing, and is simply rewritten)."""
        found = [p.name for p in self.layout.output_files() if p.is_file()]
        found += [p.name for p in self.layout.output_dirs() if p.is_dir() and any(p.iterdir())]
        metrics = self.layout.metrics
        valuable = [n for n in found if n != self.layout.config.name and
                    not (n == metrics.name and metrics.stat().st_size == 0)]
        return found if valuable else []

    def prepare(self) -> Optional[str]:
        """Decide fresh start vs resume, then create the run dir. Returns the checkpoint to resume from, or None.

        Everything is checked before anything in the output dir changes: the checkpoint to resume (checksums,
        falling back to the newest intact one; the shape keys of its run), the stage-1 generator a stage-2-only run
        needs, and an earlier run in the dir (kept unless ``overwrite``; even then it is only renamed aside here,
        into ``.replaced-*``, and deleted once this run has written its first checkpoint).
        """
        cfg, run = self.cfg, self.cfg.run
        self.acquire_lock()  # held from before the output check to the end of the run
        resume_path = None
        skipped: List[Tuple[str, str]] = []
        earlier = self.earlier_outputs()
        if run.resume:
            resume_path, skipped = find_resume_checkpoint(str(self.layout.checkpoints), run.resume, log=self.log)
            meta = read_meta(resume_path)
            if isinstance(meta.get('config'), dict):
                config_lib.check_resume_compatible(meta['config'], cfg, f'checkpoint {resume_path}')
        elif earlier and not run.overwrite:
            raise FileExistsError(f'{self.out} already holds a run ({", ".join(earlier[:4])}): pass --resume to '
                                  f'continue it, --overwrite to replace it, or another --output-dir')
        if cfg.stages == [2] and resume_path is None and generator_needed_from_stage1(cfg):
            check_stage1_file(stage1_file(cfg, self.layout), cfg)
        self.accelerator.wait_for_everyone()  # every process decided before the main one changes anything
        if self.is_main:
            if resume_path is None and earlier:
                self._set_earlier_run_aside(earlier)
            self._set_skipped_aside(skipped, resume_path)
            self._create(resume_path)
        self.accelerator.wait_for_everyone()
        return resume_path

    def _set_earlier_run_aside(self, earlier: List[str]) -> None:
        """--overwrite: rename the earlier run aside (deleted last, by :meth:`discard_set_aside`)."""
        cfg = self.cfg
        keep = {self.layout.generator_stage1.name} if cfg.stages == [2] and not cfg.model.init_generator else set()
        aside = os.path.join(self.out, f'.replaced-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}')
        os.makedirs(aside)
        for name in earlier:
            if name not in keep:
                os.replace(os.path.join(self.out, name), os.path.join(aside, name))
        self.set_aside = aside
        self.log(f'--overwrite: the earlier run in {self.out} was moved to {aside}; it is deleted when '
                 f'this run has written its first checkpoint')

    def _set_skipped_aside(self, skipped: List[Tuple[str, str]], resume_path: Optional[str]) -> None:
        """Checkpoints that failed their checks: kept for inspection, out of the way of `latest` and
        keep_checkpoints."""
        for path, why in skipped:
            target = os.path.join(os.path.dirname(path), 'corrupt-' + os.path.basename(path))
            if not os.path.exists(target):
                os.replace(path, target)
                self.log(f'resuming from {resume_path} instead; the skipped checkpoint is kept as {target}')

    def _create(self, resume_path: Optional[str]) -> None:
        """The run dir's folders, config.yaml (with the resume's config history) and metrics.jsonl (empty, or cut
        back to the resumed checkpoint)."""
        ckpt_root = str(self.layout.checkpoints)
        os.makedirs(self.layout.figures, exist_ok=True)
        os.makedirs(ckpt_root, exist_ok=True)
        clean_partial(ckpt_root)
        saved = self.cfg.replace(overwrite=False, resume=None)  # a copied config.yaml must not replace runs elsewhere
        history = self.record_config_changes(resume_path, saved) if resume_path is not None else []
        atomic_write_text(str(self.layout.config), config_history_header(history) + config_lib.dump_yaml(saved))
        if resume_path is None:
            atomic_write_text(str(self.layout.metrics), '')
        else:
            meta = read_meta(resume_path)
            truncate_metrics(str(self.layout.metrics), int(meta['stage']), int(meta['step']))

    def record_config_changes(self, resume_path: str, new_cfg: PretrainConfig) -> List[Dict[str, Any]]:
        """Keys a --resume changed (lr, stage2_steps, ...: the shape keys are refused earlier): one line each, and
        ``{stage, step, key, old, new}`` appended to config_history.jsonl (records after the resumed checkpoint,
        from a killed later attempt, are dropped). Returns the run's whole history, for config.yaml's header."""
        meta = read_meta(resume_path)
        at = (int(meta['stage']), int(meta['step']))
        history = [r for r in read_config_history(str(self.layout.config_history))
                   if (r.get('stage', 0), r.get('step', 0)) <= at]
        old = self._saved_config()
        new = new_cfg.to_flat()
        for key in new:
            if key in config_lib.RUNTIME_KEYS or key not in old or old[key] == new[key]:
                continue
            history.append({'stage': at[0], 'step': at[1], 'key': key, 'old': old[key], 'new': new[key]})
            self.log(f'--resume: {key} changes from {old[key]!r} to {new[key]!r} at stage {at[0]} step {at[1]} '
                     f'(recorded in {self.layout.config_history.name}; config.yaml holds the new value)')
        atomic_write_text(str(self.layout.config_history), ''.join(json.dumps(r) + '\n' for r in history))
        if not history:
            os.remove(self.layout.config_history)
        return history

    def _saved_config(self) -> Dict[str, Any]:
        """The flat config of the run's config.yaml as it stands (empty when unreadable)."""
        import yaml
        try:
            loaded = yaml.safe_load(self.layout.config.read_text(encoding='utf-8'))
            if isinstance(loaded, dict):
                base = dict(config_lib.DEFAULTS)
                base.update({k: v for k, v in loaded.items() if k in base})
                return config_lib.PretrainConfig.from_flat(base).to_flat()
        except (OSError, ValueError, yaml.YAMLError):
            pass
        return {}

    # ------------------------------------------------------------------ after the first checkpoint, at a failure
    def discard_set_aside(self) -> None:
        """After this run's first checkpoint: delete the earlier run(s) --overwrite renamed aside (also those of
        earlier --overwrite attempts killed before their first checkpoint)."""
        if self.set_aside and self.is_main:
            for name in os.listdir(self.out):
                if name.startswith('.replaced-'):
                    shutil.rmtree(os.path.join(self.out, name), ignore_errors=True)
            self.set_aside = None

    def failure_note(self) -> Optional[str]:
        """Where the earlier run is kept when an --overwrite failed before its first checkpoint (None otherwise)."""
        if self.set_aside and os.path.isdir(self.set_aside):
            return (f'note: the earlier run this --overwrite replaces is kept in {self.set_aside}: move its files '
                    f'back into {self.out} to restore it, or delete the folder')
        return None


def truncate_metrics(path: str, stage: int, step: int) -> None:
    """Drop records after the checkpoint (written by the killed run after its last checkpoint)."""
    if not os.path.isfile(path):
        return
    keep = []
    with open(path, 'r', encoding='utf-8') as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if (rec.get('stage', 0), rec.get('step', 0)) <= (stage, step):
                keep.append(json.dumps(rec))
    atomic_write_text(path, ''.join(k + '\n' for k in keep))


def read_config_history(path: str) -> List[Dict[str, Any]]:
    """The records of config_history.jsonl (unreadable lines skipped; none when the file is missing)."""
    out: List[Dict[str, Any]] = []
    if os.path.isfile(path):
        with open(path, 'r', encoding='utf-8') as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    out.append(rec)
    return out


def config_history_header(history: List[Dict[str, Any]]) -> str:
    """YAML comment lines for config.yaml saying which keys held other values before a --resume (config.yaml
    holds the latest values; it must not read as if they held for the whole run)."""
    if not history:
        return ''
    lines = ['# resumed with changed keys (config_history.jsonl); the values below hold from that point on:']
    lines += [f"#   {r['key']}: {r['old']!r} until stage {r['stage']} step {r['step']}, then {r['new']!r}"
              for r in history]
    return '\n'.join(lines) + '\n'

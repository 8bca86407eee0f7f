"""The pretraining run: the configured stages (stages.py), each a loop of steps, with Hugging Face Accelerate,
seeding and checkpoints. Around the loop, one module per job: the run directory (run_dir.py), the data
(run_data.py), metrics and messages (metrics.py), figures and weights (outputs.py).

Reproducibility: every random draw is seeded from ``(seed, stage, step, process, sample)`` (data, masks, buffer
picks, GAN noise) and the global torch RNG (dropout, noise fill) is reseeded at every step, so a run resumed from a
checkpoint is bitwise identical on CPU to an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from timm_spot.run_layout import RunLayout

from . import config as config_lib
from .batches import TAG_TORCH, StreamPosition, derive_seed
from .checkpoint import (CheckpointError, DiskFullError, atomic_write_text, dir_size, disk_full_message,
                         is_disk_full, load_frozen, load_process_state, read_latest, read_meta, save_checkpoint)
from .config import PretrainConfig
from .context import StepContext, make_accelerator, to_memory_format
from .history import HistoryBuffer
from .metrics import Console, Meters, MetricsLog, ShortcutRecords, param_hash
from .networks import NetworkBuilder, generator_needed_from_stage1, load_stage1_generator, stage1_file
from .outputs import RunOutputs
from .run_data import RunData
from .run_dir import RunDirectory
from .stages import Stage1, Stage2

Stage = Union[Stage1, Stage2]


class Pretrainer:
    """One pretraining run: ``Pretrainer(cfg).run()`` runs the configured stages into ``cfg.run.output_dir``."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.out = os.path.abspath(cfg.run.output_dir)
        self.layout = RunLayout(self.out)
        self.accelerator, self.mixed_precision, self.channels_last = make_accelerator(cfg, self.layout)
        acc = self.accelerator
        self.device = acc.device
        self.rank, self.world, self.is_main = acc.process_index, acc.num_processes, acc.is_main_process
        self.console = Console(self.is_main)
        self.run_dir = RunDirectory(cfg, self.layout, acc, self.console.info)
        self.data = RunData(cfg, acc, self.console)
        self.outputs = RunOutputs(cfg, self.layout, self.is_main, self.console.info)
        self.networks = NetworkBuilder(cfg, self.device)
        self.ckpt_root = str(self.layout.checkpoints)
        m = cfg.method
        self.history = HistoryBuffer(m.history_batches * cfg.schedule.batch_size, m.history_fraction,
                                     enabled=m.history)
        self.stream_position = StreamPosition()
        self.meters = Meters(self.device)
        self.debug_record: Dict[str, Any] = {'samples': {}, 'param_hash': {}}
        self.generator: Optional[nn.Module] = None  # created before the stages; the stages create the others
        self.discriminator: Optional[nn.Module] = None
        self.gan: Optional[nn.Module] = None
        self.last_checkpoint: Optional[str] = None

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return to_memory_format(x, self.channels_last)

    def create_discriminator(self) -> nn.Module:
        return self.networks.create_discriminator()

    def kept_checkpoint(self) -> Optional[str]:
        """The last good checkpoint (what a stop leaves to resume from)."""
        return self.last_checkpoint or read_latest(self.ckpt_root)

    # ------------------------------------------------------------------ the run
    def run(self) -> Dict[str, Any]:
        self.run_dir.acquire_lock()
        try:
            return self._run()
        except BaseException:
            note = self.run_dir.failure_note()  # --overwrite failed before its first checkpoint
            if note:
                print(note, file=sys.stderr, flush=True)
            raise
        finally:
            self.run_dir.release_lock()

    def _run(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.data.open()  # the data source yields images before the output dir is touched
        self.outputs.draw_figure_inputs(self.data.ds, self.device)
        self.metrics = MetricsLog(cfg, self.layout, self.accelerator, self.console, self.data.totals,
                                  self.data.steps_per_epoch)
        self.shortcut = ShortcutRecords(cfg, self.data.ds, self.accelerator, self.channels_last)
        resume_path = self.run_dir.prepare()
        resume_meta = read_meta(resume_path) if resume_path else None
        if cfg.run.tensorboard:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_flat().items()}
            self.accelerator.init_trackers('pretrain', config=flat)
        self.log_start()
        if generator_needed_from_stage1(cfg):
            self.generator = self.networks.create_generator()
        try:
            for number in cfg.stages:
                resume_here = None
                if resume_meta is not None:
                    if int(resume_meta['stage']) > number:
                        self.console.info(f'stage {number}: already done in the resumed run')
                        continue
                    if int(resume_meta['stage']) == number:
                        resume_here = resume_path
                if number == 1 and not cfg.needs_autoencoder:
                    self.console.info('stage 1 skipped: ablation (l) trains a GAN against raw images, no autoencoder')
                    continue
                if number == 2 and 1 not in cfg.stages and resume_here is None and self.generator is not None:
                    note = load_stage1_generator(self.generator, stage1_file(cfg, self.layout))
                    self.console.info(f'stage 2: {note}')
                self.run_stage(number, resume_here)
        finally:
            if cfg.run.tensorboard:
                self.accelerator.end_training()
            if self.console.pbar is not None:
                self.console.pbar.close()
        self.accelerator.wait_for_everyone()
        self.console.info(f'done: outputs in {self.out}')
        return {'output_dir': self.out}

    def log_start(self) -> None:
        cfg, data, ablation = self.cfg, self.data, self.cfg.method.ablation
        self.console.info(
            f'timm-spot pretraining: {self.out} | data {cfg.data.data!r} '
            f'({data.n_images if data.n_images else "?"} images) | {self.world} process(es) on '
            f'{self.device} ({self.mixed_precision if self.mixed_precision != "no" else "float32"}'
            f'{", channels_last" if self.channels_last else ""}'
            f'{f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""}) | '
            f'batch {cfg.schedule.batch_size}/process | stage steps {data.totals}'
            + (f' | ablation ({ablation}) {config_lib.ABLATION_NAMES[ablation]}' if ablation else ''))

    def step_context(self) -> StepContext:
        """What the stages get from the run (and nothing else of it)."""
        return StepContext(self.cfg, self.accelerator, self.networks, self.history, self.data.totals,
                           generator=self.generator, channels_last=self.channels_last,
                           kept_checkpoint=self.kept_checkpoint)

    def build_stage(self, number: int) -> Stage:
        """The stage's networks, optimizers and step (stages.py), with this process's state reset."""
        self.meters.reset()
        self.history.clear()
        self.stream_position.epoch = self.stream_position.offset = 0
        if number == 1:
            return Stage1(self.step_context())
        stage = Stage2(self.step_context())
        self.discriminator, self.gan = stage.disc, stage.gan  # what stage 2 created
        return stage

    def run_stage(self, number: int, resume_path: Optional[str]) -> None:
        stage = self.build_stage(number)
        start = self.load_checkpoint(resume_path, number, stage) if resume_path else 0
        stage.set_modes()
        what = 'autoencoder' if number == 1 else 'damage & repair vs discriminator'
        max_steps = self.cfg.schedule.max_steps
        self.console.info(f'stage {number} ({what}): steps {start}..{self.data.totals[number]}'
                          + (f' (max_steps {max_steps})' if max_steps is not None else ''))
        self.loop(number, start, stage)
        self.outputs.write_weights(number, self.generator, self.discriminator, self.gan)
        if number == 1:
            self.generator.requires_grad_(False)
        self.accelerator.free_memory()

    # ------------------------------------------------------------------ the step loop
    def loop(self, number: int, start_step: int, stage: Stage) -> None:
        cfg = self.cfg
        total = self.data.totals[number]
        limit = total if cfg.schedule.max_steps is None else min(total, cfg.schedule.max_steps)
        self.console.pbar = tqdm(total=limit, initial=min(start_step, limit), desc=f'stage {number}',
                                 dynamic_ncols=True, disable=not (self.is_main and cfg.run.progress), file=sys.stdout)
        batches = self.data.batches(number, start_step, self.stream_position, self.meters)
        step = start_step
        self.outputs.maybe_snapshot(number, step, total, self.discriminator)
        t_mark = time.perf_counter()
        while step < limit:
            images, skipped, indices, position = next(batches)
            torch.manual_seed(derive_seed(cfg.run.seed, number, step, self.rank, TAG_TORCH))  # dropout, noise fill
            x = self.memory_format(images.to(self.device, non_blocking=True))
            if cfg.nan_at == (number, step):
                x = x * float('nan')
            metrics = stage.step(step, x)
            self.meters.add(metrics)
            self.meters.skipped += int(skipped)
            self.meters.skipped_total += int(skipped)
            if position is not None:
                self.stream_position.epoch, self.stream_position.offset = position
            if cfg.debug.debug_dump:
                self.debug_record['samples'][f'{number}:{step}'] = [int(i) for i in indices]
            step += 1
            self.meters.seconds += time.perf_counter() - t_mark
            self.console.pbar.update(1)
            self.after_step(number, step, limit, stage)
            t_mark = time.perf_counter()
        self.console.pbar.close()
        self.console.pbar = None
        if start_step < limit or self.last_checkpoint is None or \
                os.path.basename(self.last_checkpoint) != f'stage{number}_step{limit:07d}':
            self.save(stage, number, limit)
        self.outputs.figure(number, limit, self.generator, self.gan)
        if cfg.debug.debug_dump:
            self.write_debug_record(number, stage)

    def after_step(self, number: int, step: int, limit: int, stage: Stage) -> None:
        """What the schedule asks for after ``step`` steps: a metrics record, a figure, a checkpoint, a snapshot."""
        run = self.cfg.run
        if step % run.log_every == 0 or step == limit or self.shortcut.due(number, step, limit):
            extra = self.shortcut(number, step, limit, self.generator, self.discriminator)  # main process only
            self.metrics.write(self.meters, number, step, extra)
        if run.figure_every and step % run.figure_every == 0 and step < limit:
            self.outputs.figure(number, step, self.generator, self.gan)
        if run.checkpoint_every and step % run.checkpoint_every == 0 and step < limit:
            self.save(stage, number, step)
        self.outputs.maybe_snapshot(number, step, self.data.totals[number], self.discriminator)
        if self.cfg.debug.debug_step_sleep:
            time.sleep(self.cfg.debug.debug_step_sleep)

    def write_debug_record(self, number: int, stage: Stage) -> None:
        self.debug_record['param_hash'][str(number)] = {k: param_hash(m) for k, m in stage.hashed.items()}
        path = self.layout.debug_record(self.rank)
        os.makedirs(path.parent, exist_ok=True)
        atomic_write_text(str(path), json.dumps(self.debug_record))

    # ------------------------------------------------------------------ checkpoints
    def process_state(self) -> Dict[str, Any]:
        """This process's state beside Accelerate's (the history buffer and data position differ per process)."""
        return {'history': self.history.state_dict(), 'stream': self.stream_position.state_dict(),
                'meters': self.meters.state_dict()}

    def load_checkpoint(self, path: str, number: int, stage: Stage) -> int:
        """Restore a checkpoint of stage ``number`` into the built ``stage``; returns its step."""
        meta = read_meta(path)
        if int(meta['stage']) != number:
            raise RuntimeError(f'checkpoint {path} is from stage {meta["stage"]}, expected stage {number}')
        if int(meta.get('world_size', self.world)) != self.world:
            raise CheckpointError(f"checkpoint was written by {meta['world_size']} processes, this run has "
                                  f'{self.world}; resume with the same number of processes')
        try:
            self.accelerator.load_state(path)
            state = load_process_state(path, self.rank)
            for name, module in stage.frozen.items():
                load_frozen(path, name, module)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001  (a file that passed the checks but does not load)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ''
            raise CheckpointError(f'cannot resume from checkpoint {path}: {type(e).__name__}: {first[:300]} '
                                  f'(its files: {", ".join(sorted(os.listdir(path)))})') from None
        if 'history' in state:
            self.history.load_state_dict(state['history'], device=self.device)
        if 'stream' in state:
            self.stream_position.load_state_dict(state['stream'])
        if 'meters' in state:
            self.meters.load_state_dict(state['meters'])
        self.last_checkpoint = path
        self.console.info(f'resumed from {path} (stage {number}, step {meta["step"]})')
        return int(meta['step'])

    def save(self, stage: Stage, number: int, step: int) -> None:
        kept = self.kept_checkpoint()
        try:
            self.last_checkpoint = save_checkpoint(
                self.accelerator, self.ckpt_root, number, step, self.cfg.run.keep_checkpoints,
                {'total_steps': self.data.totals[number], 'config': config_lib.resume_fingerprint(self.cfg)},
                self.process_state(), stage.frozen)
        except Exception as e:  # noqa: BLE001
            if is_disk_full(e, self.ckpt_root, needed=dir_size(kept)):
                raise DiskFullError(disk_full_message(f'checkpoint stage{number} step {step}', self.ckpt_root,
                                                      kept)) from e
            raise
        self.run_dir.discard_set_aside()

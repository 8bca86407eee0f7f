"""The pretraining run around the two stage steps (stages.py): Hugging Face Accelerate, data, seeding, metrics,
checkpoints, figures and the weights a run writes (timm_spot.run_layout).

Reproducibility: every random draw is seeded from ``(seed, stage, step, process, sample)`` (data, masks, buffer
picks, GAN noise) and the global torch RNG (dropout, noise fill) is reseeded at every step, so a run resumed from a
checkpoint is bitwise identical on CPU to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Union

import timm
import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

import timm_spot  # noqa: F401  (registers the models with timm)
from timm_spot.models.damage_repair_generator import sample_drop_mask
from timm_spot.run_layout import BACKBONE, DISCRIMINATOR, GAN, GENERATOR, RunLayout

from . import config as config_lib
from .allocator import retain_freed_memory
from .batches import (TAG_FIGURE, TAG_INIT, TAG_SHORTCUT, TAG_TORCH, MapStyleBatches, StreamingBatches, StreamPosition,
                      dataset_length, derive_seed, figure_images, map_style_loader, open_source, torch_generator)
from .checkpoint import (CheckpointError, DiskFullError, RunLock, RunLockedError, _readable_problem,
                         atomic_save_safetensors, atomic_write_text, clean_partial, dir_size, disk_full_message, find_resume_checkpoint,
                         is_disk_full, load_frozen, load_process_state, read_latest, read_meta, save_checkpoint)
from .config import PretrainConfig
from .figure3 import figure3_rows, make_grid, save_png
from .gan import DCGANGenerator
from .history import HistoryBuffer
from .shortcut import ShortcutMonitor
from .optim import NetworkUpdate
from .stages import Stage1, Stage2


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names it and the step."""


def param_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Meters:
    """Per-process sums of the step metrics over the current log interval (checkpointed). Sums stay on the
    device (no per-step host sync)."""

    def __init__(self, device=None) -> None:
        self.device = torch.device('cpu') if device is None else device
        self.reset()
        self.skipped_total = 0
        self.unreadable: set = set()  # dataset rows found unreadable in this run (each counted once)

    def reset(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.count = 0
        self.skipped = 0
        self.seconds = 0.0

    def add(self, metrics: Dict[str, torch.Tensor]) -> None:
        for k, v in metrics.items():
            v = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else float(v), dtype=torch.float32,
                                device=self.device)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.count += 1

    def state_dict(self) -> Dict[str, Any]:
        return {'sums': {k: v.detach().cpu().clone() for k, v in self.sums.items()}, 'count': self.count,
                'skipped': self.skipped,
                'skipped_total': self.skipped_total, 'unreadable': sorted(self.unreadable)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sums = {k: v.to(self.device) for k, v in state['sums'].items()}
        self.count = int(state['count'])
        self.skipped = int(state['skipped'])
        self.skipped_total = int(state['skipped_total'])
        self.unreadable = {int(r) for r in state.get('unreadable', [])}
        self.seconds = 0.0


class Pretrainer:
    """One pretraining run: ``Pretrainer(cfg).run()`` runs the configured stages into ``cfg.run.output_dir``."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.out = os.path.abspath(cfg.run.output_dir)
        self.layout = RunLayout(self.out)
        # torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: Accelerate only picks its multi-CPU
        # (gloo) mode when told to use the CPU
        distributed_env = int(os.environ.get('LOCAL_RANK', -1)) != -1 or int(os.environ.get('WORLD_SIZE', 1)) > 1
        use_cpu = cfg.run.cpu or (distributed_env and not torch.cuda.is_available())
        device_type = 'cpu' if use_cpu or not torch.cuda.is_available() else 'cuda'
        self.mixed_precision, self.channels_last = config_lib.resolve_precision(cfg.run, device_type)
        if cfg.run.compile:  # a graph dynamo cannot compile runs eagerly, with a warning, instead of failing the run
            torch._dynamo.config.suppress_errors = True
        self.accelerator = acc = Accelerator(
            cpu=use_cpu,
            mixed_precision=self.mixed_precision,
            dynamo_backend='inductor' if cfg.run.compile else None,  # compiles the prepared forwards
            log_with='tensorboard' if cfg.run.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=self.out, logging_dir=str(self.layout.tensorboard)),
        )
        self.autocast = acc.autocast
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        if self.device.type == 'cpu':
            local = int(os.environ.get('LOCAL_WORLD_SIZE', acc.state.num_processes))
            torch.set_num_threads(cfg.run.threads or config_lib.default_threads(local))
            if cfg.run.retain_freed_memory:
                retain_freed_memory()
        self.seed = cfg.run.seed
        self.batch_size = cfg.schedule.batch_size
        self.grid = cfg.grid
        self.ckpt_root = str(self.layout.checkpoints)

        m = cfg.method
        self.history = HistoryBuffer(m.history_batches * self.batch_size, m.history_fraction, enabled=m.history)
        self.stream_position = StreamPosition()
        self.meters = Meters(self.device)
        self.nan_at = cfg.nan_at
        self.debug_record: Dict[str, Any] = {'samples': {}, 'param_hash': {}}
        self.generator: Optional[nn.Module] = None
        self.discriminator: Optional[nn.Module] = None
        self.gan: Optional[nn.Module] = None
        self.shortcut: Optional[ShortcutMonitor] = None
        self.stage_totals: Dict[int, int] = {}
        self.last_checkpoint: Optional[str] = None
        self.pbar = None
        self.set_aside: Optional[str] = None
        self.lock: Optional[RunLock] = None
        self.lock_taken = False

    # ------------------------------------------------------------------ helpers
    def log_info(self, message: str) -> None:
        if self.is_main:
            if self.pbar is not None:
                self.pbar.write(message)
            else:
                print(message, flush=True)

    def _seeded(self, *parts: int) -> None:
        torch.manual_seed(derive_seed(self.seed, *parts))

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """Images in the networks' memory format (channels-last where configured)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _to_device(self, module: nn.Module) -> nn.Module:
        """On the device; parameters stay contiguous even with channels-last activations: convolutions produce
        channels-last outputs from channels-last inputs either way (oneDNN reorders weights per call regardless),
        while fused Adam copies every non-contiguous parameter and its states to contiguous and back each step
        (27 ms of a 64-px stage-2 step), and fc6's weight flattens as a view (its input is tiny) instead."""
        return module.to(self.device)

    def create_generator(self) -> nn.Module:
        self._seeded(0, 0, 0, TAG_INIT, 1)
        return self._to_device(timm.create_model(GENERATOR, **self.cfg.generator_kwargs()))

    def create_discriminator(self) -> nn.Module:
        self._seeded(0, 0, 0, TAG_INIT, 2)
        return self._to_device(timm.create_model(DISCRIMINATOR, **self.cfg.discriminator_kwargs()))

    def create_gan(self) -> nn.Module:
        self._seeded(0, 0, 0, TAG_INIT, 3)
        return self._to_device(DCGANGenerator(**self.cfg.gan_kwargs()))

    def network_update(self, module: nn.Module, params: List[torch.Tensor], stage: int, prefix: str) -> NetworkUpdate:
        """Adam for ``params`` of ``module``, stepping through Accelerate and stopping on a non-finite loss."""
        return NetworkUpdate(module, params, self.cfg.optim, self.device, prefix, self.accelerator.backward,
                             lambda step, losses: self.check_finite(stage, step, losses))

    def check_finite(self, stage: int, step: int, losses: Dict[str, torch.Tensor]) -> None:
        # one host sync for all losses (this runs every step)
        finite = torch.stack([torch.isfinite(v.detach()).all() for v in losses.values()]).tolist()
        bad = [k for k, ok in zip(losses, finite) if not ok]
        n_bad = len(bad)
        if self.world > 1:
            flag = torch.tensor([float(n_bad)], device=self.device)
            n_bad = int(self.accelerator.reduce(flag, 'sum').item())
        if n_bad:
            what = (f"loss {bad[0]!r} = {float(losses[bad[0]].detach().float().mean())}" if bad
                    else 'a loss on another process')
            keep = self.last_checkpoint or read_latest(self.ckpt_root)
            keep = f'the last good checkpoint {keep} is kept (resume with --resume)' if keep else \
                'no checkpoint had been written yet'
            raise NonFiniteLossError(
                f'non-finite {what} at stage {stage} step {step} (process {self.rank}); stopping the run: {keep}. '
                f'Lower the learning rate or check the data.')

    # ------------------------------------------------------------------ setup
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

    def _run_outputs(self) -> List[str]:
        """Names of an earlier run's outputs present in the output dir; empty when it holds nothing of value (no
        weights, checkpoints, figures or metric records: a config.yaml alone is that of a run that produced
        nothing, and is simply rewritten)."""
        found = [p.name for p in self.layout.output_files() if p.is_file()]
        found += [p.name for p in self.layout.output_dirs() if p.is_dir() and any(p.iterdir())]
        metrics = self.layout.metrics
        valuable = [n for n in found if n != self.layout.config.name and
                    not (n == metrics.name and metrics.stat().st_size == 0)]
        return found if valuable else []

    def stage1_file(self) -> str:
        """The stage-1 generator a stage-2-only run starts from."""
        return self.cfg.model.init_generator or str(self.layout.generator_stage1)

    def prepare_output(self) -> Optional[str]:
        """Decide fresh start vs resume, then create the run dir. Returns the checkpoint to resume from, or None.

        Everything is checked before anything in the output dir changes: the checkpoint to resume (checksums,
        falling back to the newest intact one; the shape keys of its run), the stage-1 generator a stage-2-only run
        needs, and an earlier run in the dir (kept unless ``overwrite``; even then it is only renamed aside here,
        into ``.replaced-*``, and deleted once this run has written its first checkpoint).
        """
        cfg, run = self.cfg, self.cfg.run
        self.acquire_lock()  # held from before the output check to the end of the run
        resume_path = None
        skipped: List[tuple] = []
        earlier = self._run_outputs()
        if run.resume:
            resume_path, skipped = find_resume_checkpoint(self.ckpt_root, run.resume, log=self.log_info)
            meta = read_meta(resume_path)
            if isinstance(meta.get('config'), dict):
                config_lib.check_resume_compatible(meta['config'], cfg, f'checkpoint {resume_path}')
        elif earlier and not run.overwrite:
            raise FileExistsError(f'{self.out} already holds a run ({", ".join(earlier[:4])}): pass --resume to '
                                  f'continue it, --overwrite to replace it, or another --output-dir')
        if cfg.stages == [2] and resume_path is None and self.generator_needed_from_stage1():
            self._check_stage1_file(self.stage1_file())
        self.accelerator.wait_for_everyone()  # every process decided before the main one changes anything
        if self.is_main:
            if resume_path is None and earlier:  # overwrite: rename the earlier run aside, delete it last
                keep = {self.layout.generator_stage1.name} if cfg.stages == [2] and not cfg.model.init_generator \
                    else set()
                aside = os.path.join(self.out, f'.replaced-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}')
                os.makedirs(aside)
                for name in earlier:
                    if name not in keep:
                        os.replace(os.path.join(self.out, name), os.path.join(aside, name))
                self.set_aside = aside
                self.log_info(f'--overwrite: the earlier run in {self.out} was moved to {aside}; it is deleted when '
                              f'this run has written its first checkpoint')
            for path, why in skipped:  # kept for inspection, out of the way of `latest` and keep_checkpoints
                target = os.path.join(os.path.dirname(path), 'corrupt-' + os.path.basename(path))
                if not os.path.exists(target):
                    os.replace(path, target)
                    self.log_info(f'resuming from {resume_path} instead; the skipped checkpoint is kept as {target}')
            os.makedirs(self.layout.figures, exist_ok=True)
            os.makedirs(self.ckpt_root, exist_ok=True)
            clean_partial(self.ckpt_root)
            saved = cfg.replace(overwrite=False, resume=None)  # a copied config.yaml must not replace runs elsewhere
            history = self.record_config_changes(resume_path, saved) if resume_path is not None else []
            atomic_write_text(str(self.layout.config), config_history_header(history) + config_lib.dump_yaml(saved))
            if resume_path is None:
                atomic_write_text(str(self.layout.metrics), '')
            else:
                meta = read_meta(resume_path)
                self._truncate_metrics(str(self.layout.metrics), int(meta['stage']), int(meta['step']))
        self.accelerator.wait_for_everyone()
        return resume_path

    def record_config_changes(self, resume_path: str, new_cfg: PretrainConfig) -> List[Dict[str, Any]]:
        """Keys a --resume changed (lr, stage2_steps, ...: the shape keys are refused earlier): one line each, and
        ``{stage, step, key, old, new}`` appended to config_history.jsonl (records after the resumed checkpoint,
        from a killed later attempt, are dropped). Returns the run's whole history, for config.yaml's header."""
        import yaml
        meta = read_meta(resume_path)
        at = (int(meta['stage']), int(meta['step']))
        history = [r for r in read_config_history(str(self.layout.config_history))
                   if (r.get('stage', 0), r.get('step', 0)) <= at]
        old: Dict[str, Any] = {}
        try:
            loaded = yaml.safe_load(self.layout.config.read_text(encoding='utf-8'))
            if isinstance(loaded, dict):
                base = dict(config_lib.DEFAULTS)
                base.update({k: v for k, v in loaded.items() if k in base})
                old = config_lib.PretrainConfig.from_flat(base).to_flat()
        except (OSError, ValueError, yaml.YAMLError):
            old = {}
        new = new_cfg.to_flat()
        for key in new:
            if key in config_lib.RUNTIME_KEYS or key not in old or old[key] == new[key]:
                continue
            history.append({'stage': at[0], 'step': at[1], 'key': key, 'old': old[key], 'new': new[key]})
            self.log_info(f'--resume: {key} changes from {old[key]!r} to {new[key]!r} at stage {at[0]} step {at[1]} '
                          f'(recorded in {self.layout.config_history.name}; config.yaml holds the new value)')
        atomic_write_text(str(self.layout.config_history), ''.join(json.dumps(r) + '\n' for r in history))
        if not history:
            os.remove(self.layout.config_history)
        return history

    def _check_stage1_file(self, path: str) -> None:
        """The stage-1 generator a stage-2-only run starts from: present, intact, E/D shapes of this config."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f'stage 2 needs the stage-1 generator: {path} does not exist (run stage 1 '
                                    f'or set init_generator)')
        problem = _readable_problem(path) if path.endswith('.safetensors') else None
        try:
            if problem:
                raise ValueError(problem)
            with safe_open(path, 'pt') as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001
            raise ValueError(f'cannot read the stage-1 generator {path} (init_generator): {e}') from None
        with torch.device('meta'):
            own = timm.create_model(GENERATOR, **self.cfg.generator_kwargs()).state_dict()
        bad = [k for k, v in own.items() if k.startswith(('encoder.', 'decoder.', 'to_rgb.'))
               and shapes.get(k) != tuple(v.shape)]
        if bad:
            raise ValueError(f'the stage-1 generator {path} does not fit this config\'s generator: {bad[0]} is '
                             f'{shapes.get(bad[0])} there, {tuple(own[bad[0]].shape)} here (gen_widths, gen_stem_width, '
                             f'encoder_kernel_size, generator_kwargs must match the stage-1 run)')

    def generator_needed_from_stage1(self) -> bool:
        return self.cfg.needs_autoencoder or self.cfg.method.generator == 'damage_repair'

    def discard_set_aside(self) -> None:
        """After this run's first checkpoint: delete the earlier run(s) --overwrite renamed aside (also those of
        earlier --overwrite attempts killed before their first checkpoint)."""
        if self.set_aside and self.is_main:
            for name in os.listdir(self.out):
                if name.startswith('.replaced-'):
                    shutil.rmtree(os.path.join(self.out, name), ignore_errors=True)
            self.set_aside = None

    @staticmethod
    def _truncate_metrics(path: str, stage: int, step: int) -> None:
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

    def open_data(self) -> None:
        cfg = self.cfg
        with self.accelerator.main_process_first():
            self.ds = open_source(cfg.data)
        self.n_images = dataset_length(self.ds, cfg.data)
        self.streaming = not hasattr(self.ds, '__len__') or cfg.data.streaming
        global_batch = self.batch_size * self.world
        self.steps_per_epoch = None
        if self.n_images:  # drop-last epochs (MapStyleBatches); a stream epoch is dataset_size images
            self.steps_per_epoch = (self.n_images // global_batch if self.n_images >= global_batch
                                    else self.n_images / global_batch)
        for stage in (1, 2):
            steps = getattr(cfg.schedule, f'stage{stage}_steps')
            if steps is None:
                if not self.n_images:
                    raise ValueError(f'cannot tell the dataset size of {cfg.data.data!r}: set dataset_size or '
                                     f'stage{stage}_steps')
                steps = math.ceil(getattr(cfg.schedule, f'stage{stage}_epochs') * self.steps_per_epoch)
            self.stage_totals[stage] = int(steps)
        self.fig_images = None
        if self.is_main:
            k = cfg.run.num_figure_images
            self.fig_images = figure_images(self.ds, cfg, k).to(self.device)
            k = self.fig_images.shape[0]
            self.fig_mask = sample_drop_mask(k, self.grid[0], self.grid[1], cfg.method.theta,
                                             generator=torch_generator(self.seed, TAG_FIGURE)).to(self.device)
            self.fig_noise = torch.randn(k, cfg.model.gan_latent_dim,
                                         generator=torch_generator(self.seed, TAG_FIGURE, 1)).to(self.device)

    def batches(self, stage: int, start_step: int) -> Iterator:
        total = self.stage_totals[stage]
        if self.streaming:
            stream = StreamingBatches(self.ds, self.cfg, stage, self.rank, self.world, total, self.stream_position)
            return ((images, self.count_unreadable(rows), indices, position)
                    for images, rows, indices, position in stream.iterate(start_step))
        batches = MapStyleBatches(self.ds, self.cfg, stage, self.rank, self.world, total)
        return ((images, self.count_unreadable(rows), indices, None)
                for images, rows, indices in map_style_loader(batches, start_step, self.cfg.data.num_workers))

    def count_unreadable(self, rows) -> int:
        """How many of ``rows`` (unreadable dataset rows of a batch; -1 for stream examples) are new to this run;
        each new row is named once."""
        new = 0
        for row in rows:
            row = int(row)
            if row >= 0 and row in self.meters.unreadable:
                continue
            new += 1
            if row < 0:
                continue
            self.meters.unreadable.add(row)
            where = ''
            try:
                cell = self.ds[row][self.cfg.data.image_column]
                if isinstance(cell, dict) and cell.get('path'):
                    where = f" ({cell['path']})"
            except Exception:  # noqa: BLE001  (only for the message)
                pass
            prefix = f'[process {self.rank}] ' if self.world > 1 else ''
            message = (f'{prefix}warning: skipping unreadable image: row {row}{where} of data source '
                       f'{self.cfg.data.data!r} (counted in skipped_images; named once)')
            if self.pbar is not None and self.is_main:
                self.pbar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr, flush=True)
        return new

    # ------------------------------------------------------------------ run
    def run(self) -> Dict[str, Any]:
        self.acquire_lock()
        try:
            return self._run()
        except BaseException:
            if self.set_aside and os.path.isdir(self.set_aside):  # --overwrite failed before its first checkpoint
                print(f'note: the earlier run this --overwrite replaces is kept in {self.set_aside}: move its files '
                      f'back into {self.out} to restore it, or delete the folder', file=sys.stderr, flush=True)
            raise
        finally:
            self.release_lock()

    def _run(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.open_data()  # the data source yields images before the output dir is touched
        resume_path = self.prepare_output()
        resume_meta = read_meta(resume_path) if resume_path else None
        if cfg.run.tensorboard:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_flat().items()}
            self.accelerator.init_trackers('pretrain', config=flat)
        ablation = cfg.method.ablation
        self.log_info(f'timm-spot pretraining: {self.out} | data {cfg.data.data!r} '
                      f'({self.n_images if self.n_images else "?"} images) | {self.world} process(es) on '
                      f'{self.device} ({self.mixed_precision if self.mixed_precision != "no" else "float32"}'
                      f'{", channels_last" if self.channels_last else ""}'
                      f'{f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""}) | '
                      f'batch {self.batch_size}/process | stage steps {self.stage_totals}'
                      + (f' | ablation ({ablation}) {config_lib.ABLATION_NAMES[ablation]}' if ablation else ''))
        if self.generator_needed_from_stage1():
            self.generator = self.create_generator()
        try:
            for stage in cfg.stages:
                resume_here = None
                if resume_meta is not None:
                    if int(resume_meta['stage']) > stage:
                        self.log_info(f'stage {stage}: already done in the resumed run')
                        continue
                    if int(resume_meta['stage']) == stage:
                        resume_here = resume_path
                if stage == 1 and not cfg.needs_autoencoder:
                    self.log_info('stage 1 skipped: ablation (l) trains a GAN against raw images, no autoencoder')
                    continue
                if stage == 2 and 1 not in cfg.stages and resume_here is None and self.generator is not None:
                    self.load_stage1_generator()
                self.run_stage(stage, resume_here)
        finally:
            if cfg.run.tensorboard:
                self.accelerator.end_training()
            if self.pbar is not None:
                self.pbar.close()
        self.accelerator.wait_for_everyone()
        self.log_info(f'done: outputs in {self.out}')
        return {'output_dir': self.out}

    def build_stage(self, number: int) -> Union[Stage1, Stage2]:
        """The stage's networks, optimizers and step (stages.py), with this process's state reset."""
        self.meters.reset()
        self.history.clear()
        self.stream_position.epoch = self.stream_position.offset = 0
        return Stage1(self) if number == 1 else Stage2(self)

    def run_stage(self, number: int, resume_path: Optional[str]) -> None:
        stage = self.build_stage(number)
        start = self.load_checkpoint(resume_path, number, stage) if resume_path else 0
        stage.set_modes()
        what = 'autoencoder' if number == 1 else 'damage & repair vs discriminator'
        max_steps = self.cfg.schedule.max_steps
        self.log_info(f'stage {number} ({what}): steps {start}..{self.stage_totals[number]}'
                      + (f' (max_steps {max_steps})' if max_steps is not None else ''))
        self.loop(number, start, stage)
        self.write_weights(number)
        if number == 1:
            self.generator.requires_grad_(False)
        self.accelerator.free_memory()

    def load_stage1_generator(self) -> None:
        path = self.stage1_file()
        if not os.path.isfile(path):
            raise FileNotFoundError(f'stage 2 needs the stage-1 generator: {path} does not exist (run stage 1 or set '
                                    f'init_generator)')
        try:
            state = load_file(path, device='cpu')
        except Exception as e:  # noqa: BLE001  (truncated or not a safetensors file)
            raise ValueError(f'cannot read the stage-1 generator {path}: {type(e).__name__}: {e}') from None
        try:
            note = load_stage1_weights(self.generator, state, path)
        except RuntimeError as e:  # other widths / kernel sizes than this config's generator
            first = str(e).strip().splitlines()[0][:300]
            raise ValueError(f'the stage-1 generator {path} does not fit this config\'s generator '
                             f'(gen_widths, gen_stem_width, encoder_kernel_size, generator_kwargs): {first}') from None
        self.log_info(f'stage 2: {note}')

    # ------------------------------------------------------------------ checkpoints
    def process_state(self) -> Dict[str, Any]:
        """This process's state beside Accelerate's (the history buffer and data position differ per process)."""
        return {'history': self.history.state_dict(), 'stream': self.stream_position.state_dict(),
                'meters': self.meters.state_dict()}

    def load_checkpoint(self, path: str, number: int, stage: Union[Stage1, Stage2]) -> int:
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
        self.log_info(f'resumed from {path} (stage {number}, step {meta["step"]})')
        return int(meta['step'])

    def save(self, stage: Union[Stage1, Stage2], number: int, step: int) -> None:
        kept = self.last_checkpoint or read_latest(self.ckpt_root)
        try:
            self.last_checkpoint = save_checkpoint(
                self.accelerator, self.ckpt_root, number, step, self.cfg.run.keep_checkpoints,
                {'total_steps': self.stage_totals[number], 'config': config_lib.resume_fingerprint(self.cfg)},
                self.process_state(), stage.frozen)
        except Exception as e:  # noqa: BLE001
            if is_disk_full(e, self.ckpt_root, needed=dir_size(kept)):
                raise DiskFullError(disk_full_message(f'checkpoint stage{number} step {step}', self.ckpt_root,
                                                      kept)) from e
            raise
        self.discard_set_aside()

    # ------------------------------------------------------------------ the step loop
    def loop(self, number: int, start_step: int, stage: Union[Stage1, Stage2]) -> None:
        cfg = self.cfg
        total = self.stage_totals[number]
        limit = total if cfg.schedule.max_steps is None else min(total, cfg.schedule.max_steps)
        self.pbar = tqdm(total=limit, initial=min(start_step, limit), desc=f'stage {number}', dynamic_ncols=True,
                         disable=not (self.is_main and cfg.run.progress), file=sys.stdout)
        batches = self.batches(number, start_step)
        step = start_step
        self.maybe_snapshot(number, step)
        t_mark = time.perf_counter()
        while step < limit:
            images, skipped, indices, position = next(batches)
            self._seeded(number, step, self.rank, TAG_TORCH)  # dropout, noise fill: a function of the step
            x = self.memory_format(images.to(self.device, non_blocking=True))
            if self.nan_at == (number, step):
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
            now = time.perf_counter()
            self.meters.seconds += now - t_mark
            self.pbar.update(1)
            if step % cfg.run.log_every == 0 or step == limit:
                self.log_metrics(number, step, self.shortcut_record(number, step, limit))
            if cfg.run.figure_every and step % cfg.run.figure_every == 0 and step < limit:
                self.figure(number, step)
            if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0 and step < limit:
                self.save(stage, number, step)
            self.maybe_snapshot(number, step)
            if cfg.debug.debug_step_sleep:
                time.sleep(cfg.debug.debug_step_sleep)
            t_mark = time.perf_counter()
        self.pbar.close()
        self.pbar = None
        if start_step < limit or self.last_checkpoint is None or \
                os.path.basename(self.last_checkpoint) != f'stage{number}_step{limit:07d}':
            self.save(stage, number, limit)
        self.figure(number, limit)
        if cfg.debug.debug_dump:
            self.debug_record['param_hash'][str(number)] = {k: param_hash(m) for k, m in stage.hashed.items()}
            path = self.layout.debug_record(self.rank)
            os.makedirs(path.parent, exist_ok=True)
            atomic_write_text(str(path), json.dumps(self.debug_record))

    def maybe_snapshot(self, stage: int, step: int) -> None:
        """Stage 2: the backbone at the configured fractions of the stage (learning curves)."""
        if stage != 2 or not self.is_main or self.discriminator is None:
            return
        total = self.stage_totals[2]
        if step not in {round(f * total) for f in self.cfg.run.snapshots}:
            return
        path = self.layout.snapshot(step)
        os.makedirs(path.parent, exist_ok=True)
        atomic_save_safetensors(self.discriminator.backbone_state_dict(), str(path))

    def shortcut_record(self, stage: int, step: int, limit: int) -> Dict[str, float]:
        """Stage 2, main process, every ``shortcut_every`` steps and at the end: the shortcut monitor's AUCs."""
        every = self.cfg.run.shortcut_every
        if stage != 2 or not self.is_main or not every or self.discriminator is None or \
                self.cfg.method.generator != 'damage_repair' or not (step % every == 0 or step == limit):
            return {}
        if self.shortcut is None:
            cfg = self.cfg
            images = figure_images(self.ds, cfg, cfg.run.shortcut_images).to(self.device)
            masks = sample_drop_mask(images.shape[0], self.grid[0], self.grid[1], cfg.method.theta,
                                     generator=torch_generator(self.seed, TAG_SHORTCUT)).to(self.device)
            self.shortcut = ShortcutMonitor(self.memory_format(images), masks)
        return self.shortcut(self.generator, self.discriminator, self.autocast)

    def log_metrics(self, stage: int, step: int, extra: Optional[Dict[str, float]] = None) -> None:
        m = self.meters
        keys = sorted(m.sums)
        vec = torch.stack([m.sums[k].float() for k in keys]
                          + [torch.tensor(float(m.count), device=self.device),
                             torch.tensor(float(m.skipped), device=self.device),
                             torch.tensor(float(m.skipped_total), device=self.device)])
        if self.world > 1:
            vec = self.accelerator.reduce(vec, 'sum')
        vec = vec.cpu()
        count = max(float(vec[len(keys)]), 1.0)
        record: Dict[str, Any] = {'stage': stage, 'step': step, 'total_steps': self.stage_totals[stage]}
        if self.steps_per_epoch:
            record['epoch'] = round(step / self.steps_per_epoch, 4)
        for i, k in enumerate(keys):
            record[k] = float(vec[i]) / count
        record['img_per_s'] = (m.count * self.batch_size * self.world / m.seconds) if m.seconds > 0 else None
        record['skipped_images'] = int(vec[len(keys) + 2])
        record['skipped_images_interval'] = int(vec[len(keys) + 1])
        record.update(extra or {})
        record['time'] = time.time()
        m.reset()
        if not self.is_main:
            return
        with open(self.layout.metrics, 'a', encoding='utf-8') as f:
            f.write(json.dumps(record) + '\n')
        if record['skipped_images_interval']:
            self.log_info(f'stage {stage} step {step}: skipped {record["skipped_images_interval"]} unreadable '
                          f'image(s) ({record["skipped_images"]} in total)')
        if self.cfg.run.tensorboard:
            offset = self.stage_totals[1] if stage == 2 else 0
            self.accelerator.log({f'stage{stage}/{k}': v for k, v in record.items()
                                  if isinstance(v, (int, float)) and k not in ('stage', 'step', 'time')},
                                 step=offset + step)
        if not self.cfg.run.progress:  # no bar: one line per record (log files, nohup)
            keys = ('ae_rec', 'c_total', 'c_class', 'c_mask', 'r_total', 'r_adv', 'r_rec', 'acc_real', 'acc_corrupt',
                    'mask_acc')
            parts = [f'{k} {record[k]:.4g}' for k in keys if k in record]
            speed = f' | {record["img_per_s"]:.1f} img/s' if record['img_per_s'] else ''
            print(f'stage {stage} step {step}/{self.stage_totals[stage]} | ' + ' '.join(parts) +
                  f' | lr {record["lr"]:.3g}{speed}', flush=True)
        if self.pbar is not None:
            post = {}
            for k in ('ae_rec', 'c_total', 'r_total', 'acc_real', 'acc_corrupt', 'mask_acc'):
                if k in record:
                    post[k] = f'{record[k]:.3g}'
            if record['img_per_s']:
                post['img/s'] = f'{record["img_per_s"]:.1f}'
            self.pbar.set_postfix(post, refresh=False)

    # ------------------------------------------------------------------ figures and weights
    @contextlib.contextmanager
    def _eval_modes(self, *modules: Optional[nn.Module]):
        saved = [(m, m.training) for root in modules if root is not None for m in root.modules()]
        try:
            for root in modules:
                if root is not None:
                    root.eval()
            yield
        finally:
            for m, mode in saved:
                m.training = mode

    def figure(self, stage: int, step: int) -> None:
        if not self.is_main or self.fig_images is None:
            return
        cfg = self.cfg
        gen, gan = self.generator, self.gan if stage == 2 else None
        with self._eval_modes(gen, gan), torch.no_grad():
            rows = figure3_rows(gen, self.fig_images, None if cfg.method.generator == 'gan' else self.fig_mask,
                                gan=gan, gan_noise=self.fig_noise if gan is not None else None,
                                with_autoencoder=cfg.needs_autoencoder)
        title = f'stage {stage} step {step}  theta={cfg.method.theta}' + \
            (f'  ablation ({cfg.method.ablation})' if cfg.method.ablation else '')
        grid = make_grid(rows, title=title)
        save_png(grid, str(self.layout.figures / f'fig3_stage{stage}_step{step:07d}.png'))
        save_png(grid, str(self.layout.figures / 'fig3_latest.png'))

    def record_weight_hashes(self, paths: List[str]) -> None:
        """sha256 of each weight file just written, in weights_sha256.json (``hub export`` refuses a file that no
        longer matches: a flipped bit in a run's weights must not be published)."""
        from .checkpoint import sha256_file
        record_path = str(self.layout.weights_sha256)
        record = _recorded_hashes(record_path)
        record.update({os.path.basename(p): sha256_file(p) for p in paths})
        atomic_write_text(record_path, json.dumps(dict(sorted(record.items())), indent=1) + '\n')

    def write_weights(self, stage: int) -> None:
        """The models of the run, each loadable with timm.create_model(name, **model_args[name]) (run_layout)."""
        if not self.is_main:
            return
        layout, cfg = self.layout, self.cfg
        model_args: Dict[str, Any] = {}
        if layout.model_args.is_file():
            try:
                model_args = json.loads(layout.model_args.read_text(encoding='utf-8'))
            except (ValueError, UnicodeDecodeError) as e:  # rewritten below from this run's config
                self.log_info(f'warning: {layout.model_args} is not valid JSON ({e}); rewriting it from the config')
            if not isinstance(model_args, dict):
                model_args = {}
        written: List[str] = []

        def save(state, path) -> None:
            atomic_save_safetensors(state, str(path))
            written.append(str(path))

        if self.generator is not None:
            state = self.generator.state_dict()
            if stage == 1:
                save(state, layout.generator_stage1)
            save(state, layout.weights(GENERATOR))
            model_args[GENERATOR] = cfg.generator_kwargs()
        if stage == 2:
            disc = self.discriminator
            save(disc.state_dict(), layout.weights(DISCRIMINATOR))
            save(disc.backbone_state_dict(), layout.weights(BACKBONE))
            model_args[DISCRIMINATOR] = cfg.discriminator_kwargs()
            model_args[BACKBONE] = {}
            if self.gan is not None:
                save(self.gan.state_dict(), layout.weights(GAN))
                model_args[GAN] = cfg.gan_kwargs()
        self.record_weight_hashes(written)
        model_args['img_size'] = cfg.augment.img_size
        model_args['how_to_load'] = ("timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file="
                                     "'<NAME>.safetensors'), **model_args[NAME]) after `import timm_spot`; "
                                     "dcgan_generator: train_scripts.gan.DCGANGenerator(**args).load_state_dict")
        atomic_write_text(str(layout.model_args), json.dumps(model_args, indent=1))


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


def _recorded_hashes(path: str) -> Dict[str, str]:
    try:
        with open(path, 'r', encoding='utf-8') as f:
            data = json.load(f)
        return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def load_stage1_weights(generator, state, path: str = 'the stage-1 file') -> str:
    """Load a stage-1 generator state into ``generator``; returns what was loaded (for the log).

    Same architecture: everything, strictly. Another repair network (ablations b, i, k reuse one stage-1
    autoencoder): only E, D and to_rgb, which are all that stage 1 trains; R keeps its initialisation.
    """
    own = generator.state_dict()
    if set(state) == set(own):
        generator.load_state_dict(state)
        return f'generator initialised from {path}'
    autoencoder = ('encoder.', 'decoder.', 'to_rgb.')
    ae_state = {k: v for k, v in state.items() if k.startswith(autoencoder)}
    missing = sorted(k for k in own if k.startswith(autoencoder) and k not in ae_state)
    if missing:
        raise RuntimeError(f'stage-1 generator {path} lacks autoencoder weights {missing[:5]} '
                           f'(trained with other encoder/decoder settings?)')
    generator.load_state_dict(ae_state, strict=False)
    return (f'autoencoder (E, D) initialised from {path}; the repair network differs from the file\'s and '
            f'starts from its initialisation')

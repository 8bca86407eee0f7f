"""The two pretraining stages of "Learning to Spot Artifacts", driven by Hugging Face Accelerate.

Stage 1 (autoencoder): E and D minimise ``30 * MSE(D(E(x)), x) + wd * |w|^2 / 2`` (Adam).

Stage 2 (damage & repair vs. discriminator), E and D frozen (``requires_grad=False``, BatchNorm in eval mode):

* real examples: ``D(E(x))`` (``real_source: input`` = ablation (a): x itself);
* corrupt examples: ``x_hat = R(damage(E(x), Omega), Omega)`` with a fresh mask per image and step, drop rate theta;
  half of the corrupt batch shown to C comes from the history buffer (with its masks);
* C step: ``L_C = CE(real vs corrupt) + 0.1 * sigmoid-CE(mask logits, Omega; real: all ones) + wd``;
* R step (after the C step, same batch, updated C): ``L_R = softplus(-C(x_hat)) + 30 * L2 on kept cells + wd``
  (``generator_loss: code``: the authors' code's L_R, C's own losses + swapped-label CE + 30 * L2; losses.py);
* two Adam optimizers (lr 3e-4, beta1 0.5, eps 1e-5), linear LR decay.

During the R step C runs in train mode on ``[real; x_hat]`` (as the code's single forward) but its BatchNorm running
statistics are restored afterwards, so they are updated once per iteration, by the C step.

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
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.nn as nn

from timm_spot.models.damage_repair_generator import sample_drop_mask

from . import config as config_lib
from .checkpoint import (CHECKPOINT_DIR, CheckpointError, DiskFullError, RunState, atomic_save_safetensors,
                         atomic_write_text, clean_partial, dir_size, disk_full_message, find_resume_checkpoint,
                         is_disk_full, read_latest, read_meta, save_checkpoint)
from .data import (TAG_FIGURE, TAG_HISTORY, TAG_INIT, TAG_MASK, TAG_NOISE, TAG_TORCH, MapStyleBatches,
                   StreamingBatches, StreamPosition, dataset_length, derive_seed, figure_images, map_style_loader,
                   open_source, torch_generator)
from .figure3 import figure3_rows, make_grid, save_png
from .history import HistoryBuffer
from .losses import (bias_parameters, decayed_parameters, discriminator_accuracies, discriminator_objective,
                     kept_cells_l2_loss, mask_accuracies, reconstruction_loss, repair_objective, scale_gradients,
                     upsample_mask, weight_decay_loss)

GENERATOR_FILE = 'damage_repair_generator.safetensors'
GENERATOR_STAGE1_FILE = 'damage_repair_generator_stage1.safetensors'
DISCRIMINATOR_FILE = 'alexnet_spot_discriminator.safetensors'
BACKBONE_FILE = 'alexnet_spot.safetensors'
GAN_FILE = 'dcgan_generator.safetensors'


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the message names it and the step."""


# ----------------------------------------------------------------------------------------------------------------
# Small modules whose forward is what DDP must see
# ----------------------------------------------------------------------------------------------------------------

class AutoencoderStep(nn.Module):
    """Stage 1 forward: D(E(x))."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator.autoencode(x)


class RepairStep(nn.Module):
    """Stage 2 generator forward: x_hat = R(damage(phi, mask), mask) from the (frozen) encoder feature phi = E(x)."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, phi: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.generator.repair_decode(self.generator.damage(phi, mask), mask)


class PretextStep(nn.Module):
    """Discriminator forward on images in [-1, 1]: (real logit [B], mask logits [B, 1, M, N] or None)."""

    def __init__(self, discriminator: nn.Module) -> None:
        super().__init__()
        self.discriminator = discriminator

    def forward(self, x: torch.Tensor):
        return self.discriminator.forward_pretext(x)


@contextlib.contextmanager
def preserved_batchnorm_stats(module: nn.Module):
    """Run ``module`` in train mode (batch statistics) without changing its BatchNorm running statistics.

    The running buffers are swapped for copies during the forward (the copies absorb the update and are dropped);
    restoring by an in-place copy would bump the version of tensors autograd saved for the backward.
    """
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            saved.append((m, m.running_mean, m.running_var, m.num_batches_tracked))
            m.running_mean = m.running_mean.clone()
            m.running_var = m.running_var.clone()
            m.num_batches_tracked = m.num_batches_tracked.clone()
    try:
        yield
    finally:
        for m, mean, var, count in saved:
            m.running_mean, m.running_var, m.num_batches_tracked = mean, var, count


def learning_rate(step: int, total: int, cfg: Dict[str, Any]) -> float:
    """LR at (0-based) ``step`` of a ``total``-step stage.

    ``paper``: linear from lr to lr * lr_end_factor (3e-4 -> 3e-6) over the stage; ``code``: TF polynomial_decay
    (power 1) to lr * lr_end_factor over the first 90 % of the steps, then constant; ``constant``.
    """
    base = float(cfg['lr'])
    end = base * float(cfg['lr_end_factor'])
    if cfg['lr_schedule'] == 'constant' or total <= 0:
        return base
    if cfg['lr_schedule'] == 'paper':
        return base + (end - base) * min(step / total, 1.0)
    decay_steps = 0.9 * total
    return (base - end) * (1.0 - min(step, decay_steps) / decay_steps) + end


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group['lr'] = lr


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


# ----------------------------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------------------------

class Pretrainer:
    def __init__(self, cfg: Dict[str, Any]) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        import timm_spot  # noqa: F401  (registers the models with timm)

        self.cfg = cfg
        self.out = os.path.abspath(cfg['output_dir'])
        # torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: Accelerate only picks its multi-CPU
        # (gloo) mode when told to use the CPU
        distributed_env = int(os.environ.get('LOCAL_RANK', -1)) != -1 or int(os.environ.get('WORLD_SIZE', 1)) > 1
        use_cpu = bool(cfg['cpu']) or (distributed_env and not torch.cuda.is_available())
        device_type = 'cpu' if use_cpu or not torch.cuda.is_available() else 'cuda'
        self.mixed_precision, self.channels_last = config_lib.resolve_precision(cfg, device_type)
        self.accelerator = Accelerator(
            cpu=use_cpu,
            mixed_precision=self.mixed_precision,
            log_with='tensorboard' if cfg['tensorboard'] else None,
            project_config=ProjectConfiguration(project_dir=self.out, logging_dir=os.path.join(self.out, 'tensorboard')),
        )
        acc = self.accelerator
        self.device = acc.device
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        if self.device.type == 'cpu':
            local = int(os.environ.get('LOCAL_WORLD_SIZE', acc.state.num_processes))
            torch.set_num_threads(int(cfg['threads']) if cfg['threads'] else config_lib.default_threads(local))
        self.seed = int(cfg['seed'])
        self.batch_size = int(cfg['batch_size'])
        self.grid = (cfg['img_size'] // 16, cfg['img_size'] // 16)
        self.ckpt_root = os.path.join(self.out, CHECKPOINT_DIR)

        self.history = HistoryBuffer(int(cfg['history_batches']) * self.batch_size, float(cfg['history_fraction']),
                                     enabled=bool(cfg['history']))
        self.stream_position = StreamPosition()
        self.meters = Meters(self.device)
        self.run_state = RunState(self.rank, self.world)
        self.run_state.device = self.device
        self.run_state.local = {'history': self.history, 'stream': self.stream_position, 'meters': self.meters}
        acc.register_for_checkpointing(self.run_state)

        self.nan_at = config_lib.parse_stage_step(cfg['debug_nan_at'], 'debug_nan_at') if cfg['debug_nan_at'] else None
        self.debug_record: Dict[str, Any] = {'samples': {}, 'param_hash': {}}
        self.generator: Optional[nn.Module] = None
        self.discriminator: Optional[nn.Module] = None
        self.gan: Optional[nn.Module] = None
        self.stage_totals: Dict[int, int] = {}
        self.last_checkpoint: Optional[str] = None
        self.pbar = None

    # ------------------------------------------------------------------ helpers
    def log_info(self, message: str) -> None:
        if self.is_main:
            if self.pbar is not None:
                self.pbar.write(message)
            else:
                print(message, flush=True)

    def _seeded(self, *parts: int) -> None:
        torch.manual_seed(derive_seed(self.seed, *parts))

    def _to_device(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def create_generator(self) -> nn.Module:
        import timm

        self._seeded(0, 0, 0, TAG_INIT, 1)
        gen = timm.create_model('damage_repair_generator', **config_lib.generator_kwargs(self.cfg))
        return self._to_device(gen)

    def create_discriminator(self) -> nn.Module:
        import timm

        self._seeded(0, 0, 0, TAG_INIT, 2)
        return self._to_device(timm.create_model('alexnet_spot_discriminator',
                                                 **config_lib.discriminator_kwargs(self.cfg)))

    def create_gan(self) -> nn.Module:
        from .gan import DCGANGenerator

        self._seeded(0, 0, 0, TAG_INIT, 3)
        return self._to_device(DCGANGenerator(self.cfg['img_size'], int(self.cfg['gan_latent_dim']),
                                              int(self.cfg['gan_width'])))

    def gan_kwargs(self) -> Dict[str, Any]:
        return dict(img_size=self.cfg['img_size'], latent_dim=int(self.cfg['gan_latent_dim']),
                    width=int(self.cfg['gan_width']))

    def needs_autoencoder(self) -> bool:
        return not (self.cfg['generator'] == 'gan' and self.cfg['real_source'] == 'input')

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
    RUN_FILES = (GENERATOR_FILE, GENERATOR_STAGE1_FILE, DISCRIMINATOR_FILE, BACKBONE_FILE, GAN_FILE, 'model_args.json',
                 'config.yaml', 'metrics.jsonl')
    RUN_DIRS = (CHECKPOINT_DIR, 'figures', 'debug', 'tensorboard')

    def _run_outputs(self) -> List[str]:
        """Names of an earlier run's outputs present in the output dir; empty when it holds nothing of value (no
        weights, checkpoints, figures or metric records: a config.yaml alone is that of a run that produced
        nothing, and is simply rewritten)."""
        found = [n for n in self.RUN_FILES if os.path.isfile(os.path.join(self.out, n))]
        found += [n for n in self.RUN_DIRS if os.path.isdir(os.path.join(self.out, n)) and
                  os.listdir(os.path.join(self.out, n))]
        metrics = os.path.join(self.out, 'metrics.jsonl')
        valuable = [n for n in found if n != 'config.yaml' and
                    not (n == 'metrics.jsonl' and os.path.getsize(metrics) == 0)]
        return found if valuable else []

    def prepare_output(self) -> Optional[str]:
        """Decide fresh start vs resume, then create the run dir. Returns the checkpoint to resume from, or None.

        Everything is checked before anything in the output dir changes: the checkpoint to resume (checksums,
        falling back to the newest intact one; the shape keys of its run), the stage-1 generator a stage-2-only run
        needs, and an earlier run in the dir (kept unless ``overwrite``; even then it is only renamed aside here,
        into ``.replaced-*``, and deleted once this run has written its first checkpoint).
        """
        cfg = self.cfg
        resume_path = None
        skipped: List[tuple] = []
        earlier = self._run_outputs()
        if cfg['resume']:
            resume_path, skipped = find_resume_checkpoint(self.ckpt_root, cfg['resume'], log=self.log_info)
            meta = read_meta(resume_path)
            if isinstance(meta.get('config'), dict):
                config_lib.check_resume_compatible(meta['config'], cfg, f'checkpoint {resume_path}')
        elif earlier and not cfg['overwrite']:
            raise FileExistsError(f'{self.out} already holds a run ({", ".join(earlier[:4])}): pass --resume to '
                                  f'continue it, --overwrite to replace it, or another --output-dir')
        if cfg['stage'] == '2' and resume_path is None and self.generator_needed_from_stage1():
            self._check_stage1_file(cfg['init_generator'] or os.path.join(self.out, GENERATOR_STAGE1_FILE))
        self.accelerator.wait_for_everyone()  # every process decided before the main one changes anything
        self.set_aside = None
        if self.is_main:
            if resume_path is None and earlier:  # overwrite: rename the earlier run aside, delete it last
                keep = {GENERATOR_STAGE1_FILE} if cfg['stage'] == '2' and not cfg['init_generator'] else set()
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
            os.makedirs(os.path.join(self.out, 'figures'), exist_ok=True)
            os.makedirs(self.ckpt_root, exist_ok=True)
            clean_partial(self.ckpt_root)
            saved = dict(cfg, overwrite=False, resume=None)  # a copied config.yaml must not replace runs elsewhere
            atomic_write_text(os.path.join(self.out, 'config.yaml'), config_lib.dump_yaml(saved))
            metrics = os.path.join(self.out, 'metrics.jsonl')
            if resume_path is None:
                atomic_write_text(metrics, '')
            else:
                meta = read_meta(resume_path)
                self._truncate_metrics(metrics, int(meta['stage']), int(meta['step']))
        self.accelerator.wait_for_everyone()
        return resume_path

    def _check_stage1_file(self, path: str) -> None:
        """The stage-1 generator a stage-2-only run starts from: present, intact, E/D shapes of this config."""
        import timm
        from safetensors import safe_open

        from .checkpoint import _readable_problem

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
            own = timm.create_model('damage_repair_generator', **config_lib.generator_kwargs(self.cfg)).state_dict()
        bad = [k for k, v in own.items() if k.startswith(('encoder.', 'decoder.', 'to_rgb.'))
               and shapes.get(k) != tuple(v.shape)]
        if bad:
            raise ValueError(f'the stage-1 generator {path} does not fit this config\'s generator: {bad[0]} is '
                             f'{shapes.get(bad[0])} there, {tuple(own[bad[0]].shape)} here (gen_widths, gen_stem_width, '
                             f'encoder_kernel_size, generator_kwargs must match the stage-1 run)')

    def generator_needed_from_stage1(self) -> bool:
        return self.needs_autoencoder() or self.cfg['generator'] == 'damage_repair'

    def discard_set_aside(self) -> None:
        """After this run's first checkpoint: delete the earlier run(s) --overwrite renamed aside (also those of
        earlier --overwrite attempts killed before their first checkpoint)."""
        if getattr(self, 'set_aside', None) and self.is_main:
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
        with self.accelerator.main_process_first():
            self.ds = open_source(self.cfg)
        self.n_images = dataset_length(self.ds, self.cfg)
        self.streaming = not hasattr(self.ds, '__len__') or bool(self.cfg['streaming'])
        global_batch = self.batch_size * self.world
        self.steps_per_epoch = None
        if self.n_images:  # drop-last epochs (MapStyleBatches); a stream epoch is dataset_size images
            self.steps_per_epoch = (self.n_images // global_batch if self.n_images >= global_batch
                                    else self.n_images / global_batch)
        for stage in (1, 2):
            steps = self.cfg[f'stage{stage}_steps']
            if steps is None:
                if not self.n_images:
                    raise ValueError(f'cannot tell the dataset size of {self.cfg["data"]!r}: set dataset_size or '
                                     f'stage{stage}_steps')
                steps = math.ceil(float(self.cfg[f'stage{stage}_epochs']) * self.steps_per_epoch)
            self.stage_totals[stage] = int(steps)
        self.fig_images = None
        if self.is_main:
            self.fig_images = figure_images(self.ds, self.cfg, int(self.cfg['num_figure_images'])).to(self.device)
            k = self.fig_images.shape[0]
            self.fig_mask = sample_drop_mask(k, self.grid[0], self.grid[1], float(self.cfg['theta']),
                                             generator=torch_generator(self.seed, TAG_FIGURE)).to(self.device)
            self.fig_noise = torch.randn(k, int(self.cfg['gan_latent_dim']),
                                         generator=torch_generator(self.seed, TAG_FIGURE, 1)).to(self.device)

    def batches(self, stage: int, start_step: int) -> Iterator:
        total = self.stage_totals[stage]
        if self.streaming:
            stream = StreamingBatches(self.ds, self.cfg, stage, self.rank, self.world, total, self.stream_position)
            return ((images, self.count_unreadable(rows), indices, position)
                    for images, rows, indices, position in stream.iterate(start_step))
        batches = MapStyleBatches(self.ds, self.cfg, stage, self.rank, self.world, total)
        return ((images, self.count_unreadable(rows), indices, None)
                for images, rows, indices in map_style_loader(batches, start_step, int(self.cfg['num_workers'])))

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
                cell = self.ds[row][self.cfg['image_column']]
                if isinstance(cell, dict) and cell.get('path'):
                    where = f" ({cell['path']})"
            except Exception:  # noqa: BLE001  (only for the message)
                pass
            prefix = f'[process {self.rank}] ' if self.world > 1 else ''
            message = (f'{prefix}warning: skipping unreadable image: row {row}{where} of data source '
                       f'{self.cfg["data"]!r} (counted in skipped_images; named once)')
            if self.pbar is not None and self.is_main:
                self.pbar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr, flush=True)
        return new

    # ------------------------------------------------------------------ run
    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.open_data()  # the data source yields images before the output dir is touched
        resume_path = self.prepare_output()
        resume_meta = read_meta(resume_path) if resume_path else None
        stages = [1, 2] if cfg['stage'] == 'both' else [int(cfg['stage'])]
        if self.cfg['tensorboard']:
            flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.items()}
            self.accelerator.init_trackers('pretrain', config=flat)
        self.log_info(f'timm-spot pretraining: {self.out} | data {cfg["data"]!r} '
                      f'({self.n_images if self.n_images else "?"} images) | {self.world} process(es) on '
                      f'{self.device} ({self.mixed_precision if self.mixed_precision != "no" else "float32"}'
                      f'{", channels_last" if self.channels_last else ""}'
                      f'{f", {torch.get_num_threads()} threads" if self.device.type == "cpu" else ""}) | '
                      f'batch {self.batch_size}/process | stage steps {self.stage_totals}'
                      + (f' | ablation ({cfg["ablation"]}) {config_lib.ABLATION_NAMES[cfg["ablation"]]}'
                         if cfg['ablation'] else ''))
        if self.needs_autoencoder() or cfg['generator'] == 'damage_repair':
            self.generator = self.create_generator()
        try:
            for stage in stages:
                resume_here = None
                if resume_meta is not None:
                    if int(resume_meta['stage']) > stage:
                        self.log_info(f'stage {stage}: already done in the resumed run')
                        continue
                    if int(resume_meta['stage']) == stage:
                        resume_here = resume_path
                if stage == 1:
                    if not self.needs_autoencoder():
                        self.log_info('stage 1 skipped: ablation (l) trains a GAN against raw images, no autoencoder')
                        continue
                    self.run_stage1(resume_here)
                else:
                    if 1 not in stages and resume_here is None and self.generator is not None:
                        self.load_stage1_generator()
                    self.run_stage2(resume_here)
        finally:
            if self.cfg['tensorboard']:
                self.accelerator.end_training()
            if self.pbar is not None:
                self.pbar.close()
        self.accelerator.wait_for_everyone()
        self.log_info(f'done: outputs in {self.out}')
        return {'output_dir': self.out}

    def load_stage1_generator(self) -> None:
        from safetensors.torch import load_file

        path = self.cfg['init_generator'] or os.path.join(self.out, GENERATOR_STAGE1_FILE)
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

    def load_checkpoint(self, path: str, stage: int) -> int:
        meta = read_meta(path)
        if int(meta['stage']) != stage:
            raise RuntimeError(f'checkpoint {path} is from stage {meta["stage"]}, expected stage {stage}')
        self.run_state.load_dir = path
        try:
            self.accelerator.load_state(path)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001  (a file that passed the checks but does not load)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ''
            raise CheckpointError(f'cannot resume from checkpoint {path}: {type(e).__name__}: {first[:300]} '
                                  f'(its files: {", ".join(sorted(os.listdir(path)))})') from None
        finally:
            self.run_state.load_dir = None
        self.last_checkpoint = path
        self.log_info(f'resumed from {path} (stage {stage}, step {self.run_state.step})')
        return int(self.run_state.step)

    def save(self, stage: int, step: int) -> None:
        kept = self.last_checkpoint or read_latest(self.ckpt_root)
        try:
            self.last_checkpoint = save_checkpoint(
                self.accelerator, self.run_state, self.ckpt_root, stage, step, int(self.cfg['keep_checkpoints']),
                {'total_steps': self.stage_totals[stage], 'config': config_lib.resume_fingerprint(self.cfg)})
        except Exception as e:  # noqa: BLE001
            if is_disk_full(e, self.ckpt_root, needed=dir_size(kept)):
                raise DiskFullError(disk_full_message(f'checkpoint stage{stage} step {step}', self.ckpt_root,
                                                      kept)) from e
            raise
        self.discard_set_aside()

    # ------------------------------------------------------------------ the step loop
    def loop(self, stage: int, start_step: int, step_fn, modules_for_hash: Dict[str, nn.Module]) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        total = self.stage_totals[stage]
        limit = total if cfg['max_steps'] is None else min(total, int(cfg['max_steps']))
        self.pbar = tqdm(total=limit, initial=min(start_step, limit), desc=f'stage {stage}', dynamic_ncols=True,
                         disable=not (self.is_main and cfg['progress']), file=sys.stdout)
        batches = self.batches(stage, start_step)
        step = start_step
        self.maybe_snapshot(stage, step)
        t_mark = time.perf_counter()
        while step < limit:
            images, skipped, indices, position = next(batches)
            self._seeded(stage, step, self.rank, TAG_TORCH)  # dropout, noise fill: a function of the step
            x = images.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if self.nan_at == (stage, step):
                x = x * float('nan')
            metrics = step_fn(step, x)
            self.meters.add(metrics)
            self.meters.skipped += int(skipped)
            self.meters.skipped_total += int(skipped)
            if position is not None:
                self.stream_position.epoch, self.stream_position.offset = position
            if cfg['debug_dump']:
                self.debug_record['samples'][f'{stage}:{step}'] = [int(i) for i in indices]
            step += 1
            now = time.perf_counter()
            self.meters.seconds += now - t_mark
            self.pbar.update(1)
            if step % int(cfg['log_every']) == 0 or step == limit:
                self.log_metrics(stage, step)
            if cfg['figure_every'] and step % int(cfg['figure_every']) == 0 and step < limit:
                self.figure(stage, step)
            if cfg['checkpoint_every'] and step % int(cfg['checkpoint_every']) == 0 and step < limit:
                self.save(stage, step)
            self.maybe_snapshot(stage, step)
            if cfg['debug_step_sleep']:
                time.sleep(float(cfg['debug_step_sleep']))
            t_mark = time.perf_counter()
        self.pbar.close()
        self.pbar = None
        if start_step < limit or self.last_checkpoint is None or \
                os.path.basename(self.last_checkpoint) != f'stage{stage}_step{limit:07d}':
            self.save(stage, limit)
        self.figure(stage, limit)
        if cfg['debug_dump']:
            self.debug_record['param_hash'][str(stage)] = {k: param_hash(m) for k, m in modules_for_hash.items()}
            path = os.path.join(self.out, 'debug', f'rank{self.rank}.json')
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write_text(path, json.dumps(self.debug_record))

    def maybe_snapshot(self, stage: int, step: int) -> None:
        """Stage 2: the backbone at the configured fractions of the stage (learning curves)."""
        if stage != 2 or not self.is_main or self.discriminator is None:
            return
        total = self.stage_totals[2]
        if step not in {round(float(f) * total) for f in self.cfg['snapshots']}:
            return
        path = os.path.join(self.out, 'snapshots', f'alexnet_spot_stage2_step{step:07d}.safetensors')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_save_safetensors(self.discriminator.backbone_state_dict(), path)

    def log_metrics(self, stage: int, step: int) -> None:
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
        record['time'] = time.time()
        m.reset()
        if not self.is_main:
            return
        with open(os.path.join(self.out, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
            f.write(json.dumps(record) + '\n')
        if record['skipped_images_interval']:
            self.log_info(f'stage {stage} step {step}: skipped {record["skipped_images_interval"]} unreadable '
                          f'image(s) ({record["skipped_images"]} in total)')
        if self.cfg['tensorboard']:
            offset = self.stage_totals[1] if stage == 2 else 0
            self.accelerator.log({f'stage{stage}/{k}': v for k, v in record.items()
                                  if isinstance(v, (int, float)) and k not in ('stage', 'step', 'time')},
                                 step=offset + step)
        if not self.cfg['progress']:  # no bar: one line per record (log files, nohup)
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
        gen, gan = self.generator, self.gan if stage == 2 else None
        with self._eval_modes(gen, gan), torch.no_grad():
            rows = figure3_rows(gen, self.fig_images, None if self.cfg['generator'] == 'gan' else self.fig_mask,
                                gan=gan, gan_noise=self.fig_noise if gan is not None else None,
                                with_autoencoder=self.needs_autoencoder())
        title = f'stage {stage} step {step}  theta={self.cfg["theta"]}' + \
            (f'  ablation ({self.cfg["ablation"]})' if self.cfg['ablation'] else '')
        grid = make_grid(rows, title=title)
        fig_dir = os.path.join(self.out, 'figures')
        save_png(grid, os.path.join(fig_dir, f'fig3_stage{stage}_step{step:07d}.png'))
        save_png(grid, os.path.join(fig_dir, 'fig3_latest.png'))

    def write_weights(self, stage: int) -> None:
        if not self.is_main:
            return
        cfg = self.cfg
        args_path = os.path.join(self.out, 'model_args.json')
        model_args: Dict[str, Any] = {}
        if os.path.isfile(args_path):
            with open(args_path, 'r', encoding='utf-8') as f:
                model_args = json.load(f)
        if self.generator is not None:
            state = self.generator.state_dict()
            if stage == 1:
                atomic_save_safetensors(state, os.path.join(self.out, GENERATOR_STAGE1_FILE))
            atomic_save_safetensors(state, os.path.join(self.out, GENERATOR_FILE))
            model_args['damage_repair_generator'] = config_lib.generator_kwargs(cfg)
        if stage == 2:
            disc = self.discriminator
            atomic_save_safetensors(disc.state_dict(), os.path.join(self.out, DISCRIMINATOR_FILE))
            atomic_save_safetensors(disc.backbone_state_dict(), os.path.join(self.out, BACKBONE_FILE))
            model_args['alexnet_spot_discriminator'] = config_lib.discriminator_kwargs(cfg)
            model_args['alexnet_spot'] = {}
            if self.gan is not None:
                atomic_save_safetensors(self.gan.state_dict(), os.path.join(self.out, GAN_FILE))
                model_args['dcgan_generator'] = self.gan_kwargs()
        model_args['img_size'] = cfg['img_size']
        model_args['how_to_load'] = ("timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file="
                                     "'<NAME>.safetensors'), **model_args[NAME]) after `import timm_spot`; "
                                     "dcgan_generator: train_scripts.gan.DCGANGenerator(**args).load_state_dict")
        atomic_write_text(args_path, json.dumps(model_args, indent=1))

    # ------------------------------------------------------------------ stage 1
    def make_adam(self, params: List[torch.Tensor], decay: List[torch.Tensor]) -> torch.optim.Optimizer:
        """Adam with the recipe's hyper-parameters; the fused kernel where torch has one (one pass over all
        tensors instead of a Python loop of small ops: the 16.8 M-weight fc6 made Adam ~10 % of a CPU step).

        The L2 weight decay ``wd * sum(w**2) / 2`` of the ``decay`` parameters has the gradient ``wd * w``, which is
        exactly what Adam's (coupled) ``weight_decay`` adds to the gradient: it is applied there, without a loss
        term and its backward (14 % of a CPU stage-2 step), unless bias gradients are scaled (``bias_grad_mult``,
        which must scale the decay's gradient too) -- see :meth:`weight_decay_term`.
        """
        cfg = self.cfg
        kwargs = dict(lr=float(cfg['lr']), betas=(float(cfg['beta1']), float(cfg['beta2'])), eps=float(cfg['adam_eps']))
        if cfg['fused_adam'] and self.device.type in ('cpu', 'cuda'):
            kwargs['fused'] = True
        groups = [{'params': params, 'weight_decay': 0.0}]
        if self.decay_in_optimizer:
            ids = {id(p) for p in decay}
            groups = [{'params': [p for p in params if id(p) in ids], 'weight_decay': float(cfg['weight_decay'])},
                      {'params': [p for p in params if id(p) not in ids], 'weight_decay': 0.0}]
        return torch.optim.Adam([g for g in groups if g['params']], **kwargs)

    @property
    def decay_in_optimizer(self) -> bool:
        return float(self.cfg['bias_grad_mult']) == 1.0

    def weight_decay_term(self, decay: List[torch.Tensor]) -> torch.Tensor:
        """The weight-decay part of a loss: its value only (for the logs) when Adam applies the decay, else the
        differentiable term."""
        wd = float(self.cfg['weight_decay'])
        if not self.decay_in_optimizer:
            return weight_decay_loss(decay, wd)
        with torch.no_grad():
            if not decay or wd == 0:
                return torch.zeros((), device=self.device)
            norms = torch._foreach_norm([p.detach() for p in decay])
            return wd * 0.5 * torch.stack(norms).float().pow(2).sum()

    def update(self, stage: int, step: int, optimizer, objective: torch.Tensor, parts: Dict[str, torch.Tensor],
               decay: List[torch.Tensor], biases: List[torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
        """One optimiser update of either network: objective + weight decay, NaN check, backward, bias-gradient
        scaling, Adam step. Returns the detached parts with ``<prefix>_wd`` and ``<prefix>_total`` for the logs."""
        wd = self.weight_decay_term(decay)
        total = objective + wd
        self.check_finite(stage, step, {**parts, f'{prefix}_wd': wd, f'{prefix}_total': total})
        optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(total)
        scale_gradients(biases, float(self.cfg['bias_grad_mult']))
        optimizer.step()
        out = {k: v.detach() for k, v in parts.items()}
        out.update({f'{prefix}_wd': wd.detach(), f'{prefix}_total': total.detach()})
        return out

    def run_stage1(self, resume_path: Optional[str]) -> None:
        step_fn = self.build_stage1()
        start = self.load_checkpoint(resume_path, 1) if resume_path else 0
        self.log_info(f'stage 1 (autoencoder): steps {start}..{self.stage_totals[1]}'
                      + (f' (max_steps {self.cfg["max_steps"]})' if self.cfg['max_steps'] is not None else ''))
        self.loop(1, start, step_fn, {'generator': self.generator})
        self.write_weights(1)
        self.generator.requires_grad_(False)
        self.accelerator.free_memory()

    def build_stage1(self):
        """Stage 1's optimizer and step function ``step_fn(step, x) -> metrics`` (also timed by benchmark.py)."""
        cfg, acc, gen = self.cfg, self.accelerator, self.generator
        total = self.stage_totals[1]
        gen.requires_grad_(False)
        params = list(gen.autoencoder_parameters())
        for p in params:
            p.requires_grad_(True)
        gen.train()
        decay = decayed_parameters(gen, params, bool(cfg['weight_decay_biases']))
        optimizer = self.make_adam(params, decay)
        model, optimizer = acc.prepare(AutoencoderStep(gen), optimizer)
        biases = bias_parameters(gen, params)
        self.run_state.frozen = {}
        self.run_state.stage = 1
        self.meters.reset()
        ae_weight = float(cfg['ae_loss_weight'])

        def step_fn(step: int, x: torch.Tensor) -> Dict[str, torch.Tensor]:
            lr = learning_rate(step, total, cfg)
            set_lr(optimizer, lr)
            rec = reconstruction_loss(model(x), x, ae_weight)  # Eq. (3)
            out = self.update(1, step, optimizer, rec, {'ae_rec': rec}, decay, biases, 'ae')
            out.update({'ae_mse': out['ae_rec'] / ae_weight, 'lr': torch.tensor(lr)})
            return out

        return step_fn

    # ------------------------------------------------------------------ stage 2
    def run_stage2(self, resume_path: Optional[str]) -> None:
        step_fn, set_modes, hashed = self.build_stage2()
        start = self.load_checkpoint(resume_path, 2) if resume_path else 0
        set_modes()
        self.log_info(f'stage 2 (damage & repair vs discriminator): steps {start}..{self.stage_totals[2]}'
                      + (f' (max_steps {self.cfg["max_steps"]})' if self.cfg['max_steps'] is not None else ''))
        self.loop(2, start, step_fn, hashed)
        self.write_weights(2)
        self.accelerator.free_memory()

    def build_stage2(self):
        """Stage 2's models, optimizers and step function; returns ``(step_fn, set_modes, modules_to_hash)``."""
        cfg, acc = self.cfg, self.accelerator
        total = self.stage_totals[2]
        gen = self.generator
        include_biases = bool(cfg['weight_decay_biases'])

        # frozen E and D (BN eval); trainable R (or the GAN generator)
        if gen is not None:
            gen.requires_grad_(False)
        r_params: List[torch.Tensor] = []
        r_root: Optional[nn.Module] = None
        if cfg['generator'] == 'gan':
            self.gan = self.create_gan()
            r_root = self.gan
            r_params = list(self.gan.parameters())
        elif gen is not None:
            r_params = list(gen.repair_parameters())
            for p in r_params:
                p.requires_grad_(True)
            r_root = gen

        def set_modes() -> None:
            if gen is not None:
                gen.train()
                gen.encoder.eval()
                gen.decoder.eval()
                gen.to_rgb.eval()
            if self.gan is not None:
                self.gan.train()
            self.discriminator.train()

        self.discriminator = disc = self.create_discriminator()
        set_modes()
        c_params = list(disc.parameters())
        c_decay = decayed_parameters(disc, c_params, include_biases)
        r_decay = decayed_parameters(r_root, r_params, include_biases) if r_params else []
        c_opt = self.make_adam(c_params, c_decay)
        c_model, c_opt = acc.prepare(PretextStep(disc), c_opt)
        r_model = r_opt = None
        if r_params:
            r_opt = self.make_adam(r_params, r_decay)
            r_module = RepairStep(gen) if cfg['generator'] == 'damage_repair' else self.gan
            r_model, r_opt = acc.prepare(r_module, r_opt)
        self.run_state.frozen = {}
        if gen is not None and (r_model is None or cfg['generator'] == 'gan'):
            self.run_state.frozen['generator'] = gen  # not prepared: saved through RunState
        set_modes()
        c_biases = bias_parameters(disc, c_params)
        r_biases = bias_parameters(r_root, r_params) if r_params else []
        self.run_state.stage = 2
        self.meters.reset()
        self.history.clear()
        self.stream_position.epoch = self.stream_position.offset = 0

        theta = float(cfg['theta'])
        w_cls, w_mask = float(cfg['class_loss_weight']), float(cfg['mask_loss_weight'])
        w_adv, w_rec = float(cfg['adv_loss_weight']), float(cfg['rec_loss_weight'])
        use_gan = cfg['generator'] == 'gan'
        generator_loss, r_lr_factor = cfg['generator_loss'], float(cfg['r_lr_factor'])
        real_is_input = cfg['real_source'] == 'input'
        autocast = acc.autocast
        phase = torch.profiler.record_function  # labels for benchmark.py --profile (no cost otherwise)

        def step_fn(step: int, x: torch.Tensor) -> Dict[str, torch.Tensor]:
            b = x.shape[0]
            lr = learning_rate(step, total, cfg)
            with phase('stage2: real and corrupt examples'):
                # ---- real and corrupt examples
                with torch.no_grad(), autocast():  # E is frozen: phi = E(x) once, no graph, for both paths
                    phi = None if gen is None else gen.encode(x)
                    x_real = x if real_is_input else gen.decode(phi)
                x_real = x_real.float()
                if use_gan:
                    z = self.gan.sample_noise(b, generator=torch_generator(self.seed, 2, step, self.rank, TAG_NOISE))
                    x_hat = r_model(z.to(self.device))
                    mask = torch.zeros((b, 1) + self.grid, device=self.device)
                else:
                    mask = gen.sample_mask(b, self.grid, theta,
                                           generator=torch_generator(self.seed, 2, step, self.rank, TAG_MASK)).to(self.device)
                    if r_model is not None:
                        x_hat = r_model(phi, mask)
                    else:
                        with torch.no_grad(), autocast():
                            x_hat = gen.repair_decode(gen.damage(phi, mask), mask)
                x_hat = x_hat.float()
                corrupt, corrupt_masks, from_history = self.history.mix(
                    x_hat.detach(), mask, torch_generator(self.seed, 2, step, self.rank, TAG_HISTORY))

            with phase('stage2: C step'):
                # ---- C step
                set_lr(c_opt, lr)
                c_in = torch.cat([x_real, corrupt])
                if self.channels_last:
                    c_in = c_in.contiguous(memory_format=torch.channels_last)
                logits, mask_logits = c_model(c_in)
                m_real, m_corrupt = (None, None) if mask_logits is None else (mask_logits[:b], mask_logits[b:])
                c_obj, c_parts = discriminator_objective(logits[:b], logits[b:], m_real, m_corrupt, corrupt_masks,
                                                         w_cls, w_mask)
                out = self.update(2, step, c_opt, c_obj, c_parts, c_decay, c_biases, 'c')
                out.update({'lr': torch.tensor(lr),
                            'history_fraction': from_history.float().mean(),
                            'logit_real': logits[:b].detach().float().mean(),
                            'logit_corrupt': logits[b:].detach().float().mean()})
                out.update(discriminator_accuracies(logits[:b].detach(), logits[b:].detach()))
                if mask_logits is not None and not use_gan:
                    out.update(mask_accuracies(mask_logits[:b].detach(), mask_logits[b:].detach(), corrupt_masks))
                if not use_gan:  # how far corrupt images are from the real ones, on dropped pixels
                    dropped = 1.0 - upsample_mask(mask, x.shape[-2:])
                    out['corrupt_l1_dropped'] = ((x_hat.detach() - x_real).abs() * dropped).sum() / \
                        (dropped.sum() * x.shape[1]).clamp_min(1.0)

            with phase('stage2: R step'):
                # ---- R step (updated C, same batch; C's BN statistics untouched)
                if r_model is not None:
                    set_lr(r_opt, lr * r_lr_factor)
                    disc.requires_grad_(False)
                    try:
                        r_in = torch.cat([x_real, x_hat])
                        if self.channels_last:
                            r_in = r_in.contiguous(memory_format=torch.channels_last)
                        with preserved_batchnorm_stats(disc), autocast():
                            r_logits, r_mask_logits = disc.forward_pretext(r_in)
                        rm_real, rm_corrupt = (None, None) if r_mask_logits is None else \
                            (r_mask_logits[:b], r_mask_logits[b:])
                        r_obj, r_parts = repair_objective(r_logits[:b], r_logits[b:], rm_real, rm_corrupt, x_hat, x,
                                                          None if use_gan else mask, generator_loss, w_adv, w_rec,
                                                          w_cls, w_mask)
                        out.update(self.update(2, step, r_opt, r_obj, r_parts, r_decay, r_biases, 'r'))
                    finally:
                        disc.requires_grad_(True)
                elif not use_gan:  # no repair network (ablation k): the kept-cell L2 as a monitor only
                    with torch.no_grad():
                        out['r_rec'] = kept_cells_l2_loss(x_hat, x, mask)
            return out

        hashed = {'discriminator': disc}
        if r_params:
            hashed['generator' if not use_gan else 'gan'] = r_root
        return step_fn, set_modes, hashed


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

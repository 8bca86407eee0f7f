"""What one stage step needs, and nothing more: :class:`StepContext`, and the accelerator it runs on.

The trainer builds one per stage (``Pretrainer.step_context``), ``benchmark.py`` builds one directly; the stages
(stages.py) read it and return the networks they create.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from timm_spot.run_layout import RunLayout

from . import config as config_lib
from .allocator import retain_freed_memory
from .config import PretrainConfig
from .history import HistoryBuffer
from .networks import NetworkBuilder
from .optim import FiniteLossCheck, NetworkUpdate


def make_accelerator(cfg: PretrainConfig, layout: RunLayout):
    """Accelerate for this machine and config; returns ``(accelerator, mixed_precision, channels_last)``."""
    # torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: Accelerate only picks its multi-CPU
    # (gloo) mode when told to use the CPU
    distributed_env = int(os.environ.get('LOCAL_RANK', -1)) != -1 or int(os.environ.get('WORLD_SIZE', 1)) > 1
    use_cpu = cfg.run.cpu or (distributed_env and not torch.cuda.is_available())
    device_type = 'cpu' if use_cpu or not torch.cuda.is_available() else 'cuda'
    mixed_precision, channels_last = config_lib.resolve_precision(cfg.run, device_type)
    if cfg.run.compile:  # a graph dynamo cannot compile is an error naming it, never a silent eager fallback
        torch._dynamo.config.suppress_errors = False
    acc = Accelerator(
        cpu=use_cpu,
        mixed_precision=mixed_precision,
        dynamo_backend='inductor' if cfg.run.compile else None,  # compiles the prepared forwards
        log_with='tensorboard' if cfg.run.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(layout.root), logging_dir=str(layout.tensorboard)),
    )
    if acc.device.type == 'cpu':
        local = int(os.environ.get('LOCAL_WORLD_SIZE', acc.state.num_processes))
        torch.set_num_threads(cfg.run.threads or config_lib.default_threads(local))
        if cfg.run.retain_freed_memory:
            retain_freed_memory()
    return acc, mixed_precision, channels_last


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Images in the networks' memory format (channels-last where configured)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def no_checkpoint() -> Optional[str]:
    return None


@dataclass
class StepContext:
    """The networks (built, and the builder of those a stage creates), the accelerator with its autocast, the
    memory format, the config, the history buffer, the stage lengths and where the last good checkpoint is."""

    cfg: PretrainConfig
    accelerator: object  # accelerate.Accelerator: prepare, backward, autocast, device, process_index
    networks: NetworkBuilder
    history: HistoryBuffer
    totals: Dict[int, int]  # steps of stage 1 and stage 2
    generator: Optional[nn.Module] = None  # the damage & repair generator (None: ablation (l) without stage 1)
    channels_last: bool = False
    kept_checkpoint: Callable[[], Optional[str]] = field(default=no_checkpoint)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all processes (batch_size x processes): what ``lr_scaling`` scales by."""
        return self.cfg.schedule.batch_size * self.accelerator.num_processes

    @property
    def autocast(self):
        return self.accelerator.autocast

    @property
    def seed(self) -> int:
        return self.cfg.run.seed

    @property
    def grid(self) -> Tuple[int, int]:
        return self.cfg.grid

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return to_memory_format(x, self.channels_last)

    def network_update(self, module: nn.Module, params: List[torch.Tensor], stage_number: int,
                       prefix: str) -> NetworkUpdate:
        """Adam for ``params`` of ``module``, stepping through Accelerate and stopping on a non-finite loss."""
        return NetworkUpdate(module, params, self.cfg.optim, self.device, prefix, self.accelerator.backward,
                             FiniteLossCheck(self.accelerator, stage_number, self.kept_checkpoint))

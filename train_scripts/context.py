"""What one stage step needs, and nothing more: :class:`StepContext`.

The trainer builds one per stage (``Pretrainer.step_context``), ``benchmark.py`` builds one directly; the stages
(stages.py) read it and return the networks they create.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .config import PretrainConfig
from .history import HistoryBuffer
from .networks import NetworkBuilder
from .optim import FiniteLossCheck, NetworkUpdate


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

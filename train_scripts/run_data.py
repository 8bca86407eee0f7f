"""The run's data: the source opened once, the stage lengths it implies, and each stage's batches from a step on
(deterministic per process: batches.py), with unreadable images named once and counted."""
from __future__ import annotations

import math
from typing import Dict, Iterator, Optional

from .batches import MapStyleBatches, StreamingBatches, StreamPosition, dataset_length, map_style_loader, open_source
from .config import PretrainConfig
from .metrics import Console, Meters


class RunData:
    """``open()`` the source (the main process first: it may download), then ``batches(stage, start_step)``."""

    def __init__(self, cfg: PretrainConfig, accelerator, console: Console) -> None:
        self.cfg, self.accelerator, self.console = cfg, accelerator, console
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.totals: Dict[int, int] = {}
        self.steps_per_epoch: Optional[float] = None

    def open(self) -> None:
        """Open the source and fix the stage lengths (configured steps, or epochs of the dataset)."""
        cfg = self.cfg
        with self.accelerator.main_process_first():
            self.ds = open_source(cfg.data)
        self.n_images = dataset_length(self.ds, cfg.data)
        self.streaming = not hasattr(self.ds, '__len__') or cfg.data.streaming
        global_batch = cfg.schedule.batch_size * self.world
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
            self.totals[stage] = int(steps)

    def batches(self, stage_number: int, start_step: int, position: StreamPosition, meters: Meters) -> Iterator:
        """``(images, new unreadable rows, indices, stream position or None)`` per step from ``start_step``."""
        total, cfg = self.totals[stage_number], self.cfg
        if self.streaming:
            stream = StreamingBatches(self.ds, cfg, stage_number, self.rank, self.world, total, position)
            return ((images, self.count_unreadable(rows, meters), indices, at)
                    for images, rows, indices, at in stream.iterate(start_step))
        batches = MapStyleBatches(self.ds, cfg, stage_number, self.rank, self.world, total)
        return ((images, self.count_unreadable(rows, meters), indices, None)
                for images, rows, indices in map_style_loader(batches, start_step, cfg.data.num_workers))

    def count_unreadable(self, rows, meters: Meters) -> int:
        """How many of ``rows`` (unreadable dataset rows of a batch; -1 for stream examples) are new to this run;
        each new row is named once."""
        new = 0
        for row in rows:
            row = int(row)
            if row >= 0 and row in meters.unreadable:
                continue
            new += 1
            if row < 0:
                continue
            meters.unreadable.add(row)
            where = ''
            try:
                cell = self.ds[row][self.cfg.data.image_column]
                if isinstance(cell, dict) and cell.get('path'):
                    where = f" ({cell['path']})"
            except Exception:  # noqa: BLE001  (only for the message)
                pass
            prefix = f'[process {self.rank}] ' if self.world > 1 else ''
            self.console.warn(f'{prefix}warning: skipping unreadable image: row {row}{where} of data source '
                              f'{self.cfg.data.data!r} (counted in skipped_images; named once)')
        return new

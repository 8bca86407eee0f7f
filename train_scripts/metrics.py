"""What a run says while it runs: the console (progress bar and messages), the step metrics summed over a log
interval (:class:`Meters`, checkpointed), the records of metrics.jsonl (:class:`MetricsLog`; also TensorBoard and
one line per record without a bar), and stage 2's shortcut monitor on its schedule (:class:`ShortcutRecords`)."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from timm_spot.run_layout import RunLayout

from .config import PretrainConfig
from .shortcut import ShortcutMonitor

LINE_KEYS = ('ae_rec', 'c_total', 'c_class', 'c_mask', 'r_total', 'r_adv', 'r_rec', 'acc_real', 'acc_corrupt',
             'mask_acc')  # the metrics of a record's line (without a progress bar)
BAR_KEYS = ('ae_rec', 'c_total', 'r_total', 'acc_real', 'acc_corrupt', 'mask_acc')  # the progress bar's


class Console:
    """Messages of the main process, written around the progress bar while one is shown (``pbar``)."""

    def __init__(self, is_main: bool) -> None:
        self.is_main = is_main
        self.pbar = None

    def info(self, message: str) -> None:
        if self.is_main:
            if self.pbar is not None:
                self.pbar.write(message)
            else:
                print(message, flush=True)

    def warn(self, message: str) -> None:
        """On stderr, from any process."""
        if self.pbar is not None and self.is_main:
            self.pbar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)


def param_hash(module: nn.Module) -> str:
    """sha256 over a module's parameters by name (the debug record's fingerprint of a stage's networks)."""
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


class MetricsLog:
    """One record per log interval: the meters averaged over every process, appended to metrics.jsonl by the main
    process (and to TensorBoard, the console line or the progress bar)."""

    def __init__(self, cfg: PretrainConfig, layout: RunLayout, accelerator, console: Console,
                 totals: Dict[int, int], steps_per_epoch: Optional[float]) -> None:
        self.cfg, self.layout, self.accelerator, self.console = cfg, layout, accelerator, console
        self.totals, self.steps_per_epoch = totals, steps_per_epoch

    def record(self, meters: Meters, stage_number: int, step: int,
               extra: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
        """The interval's record (every process takes part in the reduction); resets ``meters``."""
        m, device, world = meters, self.accelerator.device, self.accelerator.num_processes
        keys = sorted(m.sums)
        vec = torch.stack([m.sums[k].float() for k in keys]
                          + [torch.tensor(float(m.count), device=device),
                             torch.tensor(float(m.skipped), device=device),
                             torch.tensor(float(m.skipped_total), device=device)])
        if world > 1:
            vec = self.accelerator.reduce(vec, 'sum')
        vec = vec.cpu()
        count = max(float(vec[len(keys)]), 1.0)
        record: Dict[str, Any] = {'stage': stage_number, 'step': step, 'total_steps': self.totals[stage_number]}
        if self.steps_per_epoch:
            record['epoch'] = round(step / self.steps_per_epoch, 4)
        for i, k in enumerate(keys):
            record[k] = float(vec[i]) / count
        batch = self.cfg.schedule.batch_size
        record['img_per_s'] = (m.count * batch * world / m.seconds) if m.seconds > 0 else None
        record['skipped_images'] = int(vec[len(keys) + 2])
        record['skipped_images_interval'] = int(vec[len(keys) + 1])
        record.update(extra or {})
        record['time'] = time.time()
        m.reset()
        return record

    def write(self, meters: Meters, stage_number: int, step: int, extra: Optional[Dict[str, float]] = None) -> None:
        record = self.record(meters, stage_number, step, extra)
        if not self.accelerator.is_main_process:
            return
        with open(self.layout.metrics, 'a', encoding='utf-8') as f:
            f.write(json.dumps(record) + '\n')
        if record['skipped_images_interval']:
            self.console.info(f'stage {stage_number} step {step}: skipped {record["skipped_images_interval"]} '
                              f'unreadable image(s) ({record["skipped_images"]} in total)')
        if self.cfg.run.tensorboard:
            offset = self.totals[1] if stage_number == 2 else 0
            self.accelerator.log({f'stage{stage_number}/{k}': v for k, v in record.items()
                                  if isinstance(v, (int, float)) and k not in ('stage', 'step', 'time')},
                                 step=offset + step)
        if not self.cfg.run.progress:  # no bar: one line per record (log files, nohup)
            parts = [f'{k} {record[k]:.4g}' for k in LINE_KEYS if k in record]
            speed = f' | {record["img_per_s"]:.1f} img/s' if record['img_per_s'] else ''
            print(f'stage {stage_number} step {step}/{self.totals[stage_number]} | ' + ' '.join(parts) +
                  f' | lr {record["lr"]:.3g}{speed}', flush=True)
        if self.console.pbar is not None:
            post = {k: f'{record[k]:.3g}' for k in BAR_KEYS if k in record}
            if record['img_per_s']:
                post['img/s'] = f'{record["img_per_s"]:.1f}'
            self.console.pbar.set_postfix(post, refresh=False)


class ShortcutRecords:
    """Stage 2, main process, every ``shortcut_every`` steps and at the end: the shortcut monitor's AUCs (on a fixed
    set of images and masks, drawn at the first call)."""

    def __init__(self, cfg: PretrainConfig, ds, accelerator, channels_last: bool) -> None:
        self.cfg, self.ds, self.accelerator, self.channels_last = cfg, ds, accelerator, channels_last
        self.monitor: Optional[ShortcutMonitor] = None

    def due(self, stage_number: int, step: int, limit: int) -> bool:
        """Whether a record is due at ``step`` (the same answer on every process: it decides a collective write)."""
        every = self.cfg.run.shortcut_every
        return stage_number == 2 and bool(every) and self.cfg.method.generator == 'damage_repair' and \
            (step % every == 0 or step == limit)

    def __call__(self, stage_number: int, step: int, limit: int, generator: Optional[nn.Module],
                 discriminator: Optional[nn.Module]) -> Dict[str, float]:
        cfg = self.cfg
        if not self.due(stage_number, step, limit) or not self.accelerator.is_main_process or discriminator is None:
            return {}
        if self.monitor is None:
            self.monitor = ShortcutMonitor.for_config(self.ds, cfg, cfg.run.shortcut_images, cfg.run.seed).to(
                self.accelerator.device, torch.channels_last if self.channels_last else None)
        return self.monitor(generator, discriminator, self.accelerator.autocast)

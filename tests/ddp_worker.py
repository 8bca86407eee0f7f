"""One process of tests/test_multi_process.py's DDP check (run by torchrun with 2 gloo processes on the CPU): a few
stage-2 steps of the reference and the fast step on data that differs per process; writes one JSON file per process
and step kind (rank<r>_<kind>.json in the working directory) with each network's parameter and buffer digest, which the test compares across processes."""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile

import torch

from timm_spot.run_layout import RunLayout
from train_scripts.batches import TAG_TORCH, derive_seed
from train_scripts.config import resolve
from train_scripts.context import StepContext, make_accelerator
from train_scripts.fast_step import FastStage2
from train_scripts.history import HistoryBuffer
from train_scripts.networks import NetworkBuilder
from train_scripts.stages import Stage2


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(objective: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve(dict(img_size=32, batch_size=4, gen_stem_width=8, gen_widths=[8, 16, 16, 16], history_batches=2,
                           mixed_precision='no', channels_last=False, threads=1, progress=False, output_dir=tmp,
                           objective=objective))
        acc, _, _ = make_accelerator(cfg, RunLayout(tmp))
        rank = acc.process_index
        for kind, stage_cls in (('reference', Stage2), ('fast', FastStage2)):
            networks = NetworkBuilder(cfg, acc.device)
            history = HistoryBuffer(8, 0.5)
            ctx = StepContext(cfg, acc, networks, history, {1: 10, 2: 10}, generator=networks.create_generator())
            stage = stage_cls(ctx)
            stage.set_modes()
            for step in range(3):
                x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1000 * rank + step)) * 2 - 1
                torch.manual_seed(derive_seed(cfg.run.seed, 2, step, rank, TAG_TORCH))
                stage.step(step, x)
            row = dict(kind=kind, rank=rank, world=acc.num_processes, c_params=digest(stage.disc.parameters()),
                       c_buffers=digest(stage.disc.buffers()), r_params=digest(stage.gen.repair_parameters()),
                       r_grad_requires=all(p.requires_grad for p in stage.disc.parameters()))
            with open(f'rank{rank}_{kind}.json', 'w', encoding='utf-8') as f:
                json.dump(row, f)
            acc.free_memory()


if __name__ == '__main__':
    main(sys.argv[1])

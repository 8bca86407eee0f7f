"""The files of a pretraining run directory: written by ``train_scripts/pretrain.py``, read by ``python -m hub export``.

One place for the names, so the trainer and the exporter cannot drift apart::

    alexnet_spot.safetensors                   the transferable backbone (BatchNorm folded into conv5)
    alexnet_spot_discriminator.safetensors     the pretext discriminator C
    damage_repair_generator.safetensors        E, D, R after the last stage (+ _stage1: after stage 1)
    dcgan_generator.safetensors                ablation (l) only
    model_args.json                            constructor kwargs of each model (timm.create_model(name, **args))
    config.yaml                                the resolved training config
    metrics.jsonl                              one JSON record per log step
    weights_sha256.json                        sha256 of each weight file as the run wrote it (export checks it)
    config_history.jsonl                       config keys changed on --resume: {stage, step, key, old, new}
    .lock                                      held (fcntl.lockf) by the process running in the dir
    figures/ checkpoints/ snapshots/ debug/ tensorboard/
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple, Union

BACKBONE = 'alexnet_spot'
DISCRIMINATOR = 'alexnet_spot_discriminator'
GENERATOR = 'damage_repair_generator'
GAN = 'dcgan_generator'
# the timm models a run writes (and export can publish), in that order
MODEL_NAMES: Tuple[str, ...] = (BACKBONE, DISCRIMINATOR, GENERATOR)


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run directory."""
    root: Path

    def __init__(self, root: Union[str, os.PathLike]) -> None:
        object.__setattr__(self, 'root', Path(root))

    def weights(self, model_name: str) -> Path:
        return self.root / f'{model_name}.safetensors'

    @property
    def generator_stage1(self) -> Path:
        return self.root / f'{GENERATOR}_stage1.safetensors'

    @property
    def model_args(self) -> Path:
        return self.root / 'model_args.json'

    @property
    def config(self) -> Path:
        return self.root / 'config.yaml'

    @property
    def metrics(self) -> Path:
        return self.root / 'metrics.jsonl'

    @property
    def weights_sha256(self) -> Path:
        """{file name: sha256} of the weight files, written with them: export refuses a file that changed since."""
        return self.root / 'weights_sha256.json'

    @property
    def config_history(self) -> Path:
        """One JSON record per config key a --resume changed (config.yaml holds the latest values only)."""
        return self.root / 'config_history.jsonl'

    @property
    def lock(self) -> Path:
        """The lock file a pretraining process holds (fcntl.lockf) while it runs in the dir; holds its pid."""
        return self.root / '.lock'

    @property
    def checkpoints(self) -> Path:
        return self.root / 'checkpoints'

    @property
    def figures(self) -> Path:
        return self.root / 'figures'

    def snapshot(self, step: int) -> Path:
        """The backbone after ``step`` steps of stage 2 (config key ``snapshots``)."""
        return self.root / 'snapshots' / f'{BACKBONE}_stage2_step{step:07d}.safetensors'

    def debug_record(self, rank: int) -> Path:
        return self.root / 'debug' / f'rank{rank}.json'

    @property
    def tensorboard(self) -> Path:
        return self.root / 'tensorboard'

    def output_files(self) -> Tuple[Path, ...]:
        """Files that make a directory hold a run (an earlier run is never overwritten silently)."""
        return tuple(self.weights(n) for n in MODEL_NAMES + (GAN,)) + (
            self.generator_stage1, self.model_args, self.config, self.metrics, self.weights_sha256,
            self.config_history)

    def output_dirs(self) -> Tuple[Path, ...]:
        return (self.checkpoints, self.figures, self.root / 'snapshots', self.root / 'debug', self.tensorboard)

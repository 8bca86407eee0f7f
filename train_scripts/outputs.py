"""The files a run writes besides its checkpoints and metrics, all by the main process: the Figure-3 grids, the
weights of each stage (with model_args.json and weights_sha256.json) and stage 2's backbone snapshots."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from timm_spot.hashing import file_sha256
from timm_spot.models.damage_repair_generator import sample_drop_mask
from timm_spot.run_layout import BACKBONE, DISCRIMINATOR, GAN, GENERATOR, RunLayout

from .batches import TAG_FIGURE, figure_images, torch_generator
from .checkpoint import atomic_save_safetensors, atomic_write_text
from .config import PretrainConfig
from .figure3 import figure3_rows, make_grid, save_png
from .modes import eval_modes

HOW_TO_LOAD = ("timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file="
               "'<NAME>.safetensors'), **model_args[NAME]) after `import timm_spot`; "
               "dcgan_generator: train_scripts.gan.DCGANGenerator(**args).load_state_dict")


class RunOutputs:
    """Figures, weights and snapshots of one run directory (``layout``); nothing on other processes."""

    def __init__(self, cfg: PretrainConfig, layout: RunLayout, is_main: bool, log: Callable[[str], None]) -> None:
        self.cfg, self.layout, self.is_main, self.log = cfg, layout, is_main, log
        self.fig_images: Optional[torch.Tensor] = None

    def draw_figure_inputs(self, ds, device: torch.device) -> None:
        """The fixed images, drop masks and GAN noise of every Figure-3 grid of the run (main process)."""
        if not self.is_main:
            return
        cfg = self.cfg
        self.fig_images = figure_images(ds, cfg, cfg.run.num_figure_images).to(device)
        k = self.fig_images.shape[0]
        self.fig_mask = sample_drop_mask(k, cfg.grid[0], cfg.grid[1], cfg.method.theta,
                                         generator=torch_generator(cfg.run.seed, TAG_FIGURE)).to(device)
        self.fig_noise = torch.randn(k, cfg.model.gan_latent_dim,
                                     generator=torch_generator(cfg.run.seed, TAG_FIGURE, 1)).to(device)

    def figure(self, stage_number: int, step: int, generator: Optional[nn.Module], gan: Optional[nn.Module]) -> None:
        if not self.is_main or self.fig_images is None:
            return
        cfg = self.cfg
        gan = gan if stage_number == 2 else None
        with eval_modes(generator, gan), torch.no_grad():
            rows = figure3_rows(generator, self.fig_images, None if cfg.method.generator == 'gan' else self.fig_mask,
                                gan=gan, gan_noise=self.fig_noise if gan is not None else None,
                                with_autoencoder=cfg.needs_autoencoder)
        title = f'stage {stage_number} step {step}  theta={cfg.method.theta}' + \
            (f'  ablation ({cfg.method.ablation})' if cfg.method.ablation else '')
        grid = make_grid(rows, title=title)
        save_png(grid, str(self.layout.figures / f'fig3_stage{stage_number}_step{step:07d}.png'))
        save_png(grid, str(self.layout.figures / 'fig3_latest.png'))

    def maybe_snapshot(self, stage_number: int, step: int, total: int, discriminator: Optional[nn.Module]) -> None:
        """Stage 2: the backbone at the configured fractions of the stage (learning curves)."""
        if stage_number != 2 or not self.is_main or discriminator is None:
            return
        if step not in {round(f * total) for f in self.cfg.run.snapshots}:
            return
        path = self.layout.snapshot(step)
        os.makedirs(path.parent, exist_ok=True)
        atomic_save_safetensors(discriminator.backbone_state_dict(), str(path))

    def record_weight_hashes(self, paths: List[str]) -> None:
        """sha256 of each weight file just written, in weights_sha256.json (``hub export`` refuses a file that no
        longer matches: a flipped bit in a run's weights must not be published)."""
        record_path = str(self.layout.weights_sha256)
        record = _recorded_hashes(record_path)
        record.update({os.path.basename(p): file_sha256(p) for p in paths})
        atomic_write_text(record_path, json.dumps(dict(sorted(record.items())), indent=1) + '\n')

    def _model_args(self) -> Dict[str, Any]:
        """model_args.json as an earlier stage wrote it (empty when missing or unreadable)."""
        path, model_args = self.layout.model_args, {}
        if path.is_file():
            try:
                model_args = json.loads(path.read_text(encoding='utf-8'))
            except (ValueError, UnicodeDecodeError) as e:  # rewritten below from this run's config
                self.log(f'warning: {path} is not valid JSON ({e}); rewriting it from the config')
            if not isinstance(model_args, dict):
                model_args = {}
        return model_args

    def write_weights(self, stage_number: int, generator: Optional[nn.Module], discriminator: Optional[nn.Module],
                      gan: Optional[nn.Module]) -> None:
        """The models of the run, each loadable with timm.create_model(name, **model_args[name]) (run_layout)."""
        if not self.is_main:
            return
        layout, cfg = self.layout, self.cfg
        model_args = self._model_args()
        written: List[str] = []

        def save(state, path) -> None:
            atomic_save_safetensors(state, str(path))
            written.append(str(path))

        if generator is not None:
            state = generator.state_dict()
            if stage_number == 1:
                save(state, layout.generator_stage1)
            save(state, layout.weights(GENERATOR))
            model_args[GENERATOR] = cfg.generator_kwargs()
        if stage_number == 2:
            save(discriminator.state_dict(), layout.weights(DISCRIMINATOR))
            save(discriminator.backbone_state_dict(), layout.weights(BACKBONE))
            model_args[DISCRIMINATOR] = cfg.discriminator_kwargs()
            model_args[BACKBONE] = {}
            if gan is not None:
                save(gan.state_dict(), layout.weights(GAN))
                model_args[GAN] = cfg.gan_kwargs()
        self.record_weight_hashes(written)
        model_args['img_size'] = cfg.augment.img_size
        model_args['how_to_load'] = HOW_TO_LOAD
        atomic_write_text(str(layout.model_args), json.dumps(model_args, indent=1))


def _recorded_hashes(path: str) -> Dict[str, str]:
    try:
        with open(path, 'r', encoding='utf-8') as f:
            data = json.load(f)
        return {k: v for k, v in data.items() if isinstance(v, str)} if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}

"""The run's networks: built with seeded initialisations on the run's device, and the stage-1 generator a
stage-2-only run starts from (checked before the output dir changes, loaded when stage 2 begins)."""
from __future__ import annotations

import os

import timm
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

import timm_spot  # noqa: F401  (registers the models with timm)
from timm_spot.run_layout import DISCRIMINATOR, GENERATOR, RunLayout

from .batches import TAG_INIT, derive_seed
from .checkpoint import _readable_problem
from .config import PretrainConfig
from .gan import DCGANGenerator

AUTOENCODER = ('encoder.', 'decoder.', 'to_rgb.')  # the generator's parameters stage 1 trains


class NetworkBuilder:
    """Creates the generator, the discriminator and ablation (l)'s GAN, each from its own seeded initialisation.

    Parameters stay contiguous even with channels-last activations: convolutions produce channels-last outputs from
    channels-last inputs either way, while fused Adam would copy every non-contiguous parameter and its states to
    contiguous and back each step.
    """

    def __init__(self, cfg: PretrainConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device

    def _seeded(self, which: int) -> None:
        torch.manual_seed(derive_seed(self.cfg.run.seed, 0, 0, 0, TAG_INIT, which))

    def create_generator(self) -> nn.Module:
        self._seeded(1)
        return timm.create_model(GENERATOR, **self.cfg.generator_kwargs()).to(self.device)

    def create_discriminator(self) -> nn.Module:
        self._seeded(2)
        return timm.create_model(DISCRIMINATOR, **self.cfg.discriminator_kwargs()).to(self.device)

    def create_gan(self) -> nn.Module:
        self._seeded(3)
        return DCGANGenerator(**self.cfg.gan_kwargs()).to(self.device)


def generator_needed_from_stage1(cfg: PretrainConfig) -> bool:
    """Whether stage 2 uses the stage-1 generator (E, D; and R with damage & repair)."""
    return cfg.needs_autoencoder or cfg.method.generator == 'damage_repair'


def stage1_file(cfg: PretrainConfig, layout: RunLayout) -> str:
    """The stage-1 generator a stage-2-only run starts from."""
    return cfg.model.init_generator or str(layout.generator_stage1)


def _missing_stage1_file(path: str) -> FileNotFoundError:
    return FileNotFoundError(f'stage 2 needs the stage-1 generator: {path} does not exist (run stage 1 or set '
                             f'init_generator)')


def check_stage1_file(path: str, cfg: PretrainConfig) -> None:
    """The stage-1 generator a stage-2-only run starts from: present, intact, E/D shapes of this config."""
    if not os.path.isfile(path):
        raise _missing_stage1_file(path)
    problem = _readable_problem(path) if path.endswith('.safetensors') else None
    try:
        if problem:
            raise ValueError(problem)
        with safe_open(path, 'pt') as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise ValueError(f'cannot read the stage-1 generator {path} (init_generator): {e}') from None
    with torch.device('meta'):
        own = timm.create_model(GENERATOR, **cfg.generator_kwargs()).state_dict()
    bad = [k for k, v in own.items() if k.startswith(AUTOENCODER) and shapes.get(k) != tuple(v.shape)]
    if bad:
        raise ValueError(f'the stage-1 generator {path} does not fit this config\'s generator: {bad[0]} is '
                         f'{shapes.get(bad[0])} there, {tuple(own[bad[0]].shape)} here (gen_widths, gen_stem_width, '
                         f'encoder_kernel_size, generator_kwargs must match the stage-1 run)')


def load_stage1_generator(generator: nn.Module, path: str) -> str:
    """Load the stage-1 file at ``path`` into ``generator``; returns what was loaded (for the log)."""
    if not os.path.isfile(path):
        raise _missing_stage1_file(path)
    try:
        state = load_file(path, device='cpu')
    except Exception as e:  # noqa: BLE001  (truncated or not a safetensors file)
        raise ValueError(f'cannot read the stage-1 generator {path}: {type(e).__name__}: {e}') from None
    try:
        return load_stage1_weights(generator, state, path)
    except RuntimeError as e:  # other widths / kernel sizes than this config's generator
        first = str(e).strip().splitlines()[0][:300]
        raise ValueError(f'the stage-1 generator {path} does not fit this config\'s generator '
                         f'(gen_widths, gen_stem_width, encoder_kernel_size, generator_kwargs): {first}') from None


def load_stage1_weights(generator, state, path: str = 'the stage-1 file') -> str:
    """Load a stage-1 generator state into ``generator``; returns what was loaded (for the log).

    Same architecture: everything, strictly. Another repair network (ablations b, i, k reuse one stage-1
    autoencoder): only E, D and to_rgb, which are all that stage 1 trains; R keeps its initialisation.
    """
    own = generator.state_dict()
    if set(state) == set(own):
        generator.load_state_dict(state)
        return f'generator initialised from {path}'
    ae_state = {k: v for k, v in state.items() if k.startswith(AUTOENCODER)}
    missing = sorted(k for k in own if k.startswith(AUTOENCODER) and k not in ae_state)
    if missing:
        raise RuntimeError(f'stage-1 generator {path} lacks autoencoder weights {missing[:5]} '
                           f'(trained with other encoder/decoder settings?)')
    generator.load_state_dict(ae_state, strict=False)
    return (f'autoencoder (E, D) initialised from {path}; the repair network differs from the file\'s and '
            f'starts from its initialisation')

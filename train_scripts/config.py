"""The pretraining configuration: one typed, validated object (:class:`PretrainConfig`) built from flat keys.

Files and the command line use flat keys (``img_size: 64``, ``--set theta=0.5``); the trainer reads typed sections
(``cfg.augment.img_size``, ``cfg.method.theta``). Resolution order (later wins): defaults -> ablation preset (if
``ablation`` is set anywhere) -> YAML config file -> ``--set key=value`` / dedicated CLI flags. Values of ``--set``
are parsed as YAML (``--set gen_widths=[8,16,32,64] --set history=false``). Unknown keys are an error (with a
suggestion); every value is checked once, against its field's type and range, when the object is built.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')
DEMO_CONFIG = os.path.join(CONFIG_DIR, 'demo.yaml')


MAX_IMG_SIZE = 1024  # largest training / evaluation input size accepted (checked before anything is allocated)


class ConfigError(ValueError):
    """A bad configuration value or key (the message names it)."""


def opt(default: Any, help: str, *, low: Optional[float] = None, high: Optional[float] = None,
        low_open: bool = False, choices: Optional[tuple] = None, verbatim: bool = False) -> Any:
    """A config field: its default, its ``--help`` text and the checks of its value (range, choices).

    ``verbatim``: a ``--set`` value kept as the raw string (YAML would turn '1:3' into 63 and 'no' into False).
    """
    meta = dict(help=help, low=low, high=high, low_open=low_open, choices=choices, verbatim=verbatim)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# The defaults are the paper's ImageNet recipe; configs/*.yaml specialise them.
@dataclass
class DataConfig:
    """Where the images come from."""
    data: str = opt('builtin', "image source: 'builtin' (scikit-image photos), a folder, Parquet/Arrow file or glob "
                               "(relative paths resolve against the current dir), or a Hugging Face Hub dataset id",
                    verbatim=True)
    split: str = opt('train', 'dataset split (local files: train)', verbatim=True)
    streaming: bool = opt(False, 'stream the dataset (Hub ids); sharded per process with split_dataset_by_node')
    image_column: str = opt('image', 'column holding the images', verbatim=True)
    dataset_size: Optional[int] = opt(None, 'streaming only: images per epoch (to turn epochs into steps); null = '
                                            'from the dataset info', low=1)
    shuffle_buffer: int = opt(10000, 'streaming only: shuffle buffer size', low=1)
    holdout_per_class: Optional[int] = opt(None, 'leave out the LAST n images of every class '
                                                 '(timm_spot.data.holdout_split), so a probe validation set is never '
                                                 'seen in pretraining; needs holdout_label_column', low=1)
    holdout_label_column: str = opt('label', 'label column used only to find the held-out rows (labels are not '
                                             'trained on)', verbatim=True)
    num_workers: int = opt(2, 'data-loading worker processes (threads when streaming); 0 = in the main process', low=0)


@dataclass
class AugmentConfig:
    """The training crop (docs/method.md, "Preprocessing": random resized crop, flip, colour jitter)."""
    img_size: int = opt(128, 'training crop size in px (multiple of 16: the drop-mask / conv5 grid is img_size/16; '
                             f'at most {MAX_IMG_SIZE}, beyond which the networks and figures need tens of GB)',
                        low=16, high=MAX_IMG_SIZE)
    crop_scale: List[float] = opt([0.333, 1.0], 'random-resized-crop area range (fraction of the image)')
    crop_ratio: List[float] = opt([0.75, 1.33], 'random-resized-crop aspect-ratio range')
    interpolation: str = opt('random', "resize: 'random' (bilinear or bicubic at random, as the code), 'bilinear', "
                                       "'bicubic'", choices=('random', 'bilinear', 'bicubic'))
    antialias: bool = opt(True, 'antialias when a crop is downscaled (TF1 resize does not)')
    hflip: bool = opt(True, 'random horizontal flip')
    color_jitter: bool = opt(True, 'brightness +-32/255 and saturation x[0.5, 1.5] in random order (code: on)')


@dataclass
class ScheduleConfig:
    """How long each stage runs."""
    stage: str = opt('both', 'which stages to run: 1 (autoencoder), 2 (damage & repair vs discriminator) or both',
                     choices=('1', '2', 'both'))
    batch_size: int = opt(64, 'images per process per step (global batch = batch_size x processes)', low=1)
    stage1_epochs: float = opt(80, 'stage-1 length in epochs (used when stage1_steps is null)', low=0.0)
    stage2_epochs: float = opt(150, 'stage-2 length in epochs (used when stage2_steps is null)', low=0.0)
    stage1_steps: Optional[int] = opt(None, 'stage-1 length in optimisation steps (overrides stage1_epochs)', low=0)
    stage2_steps: Optional[int] = opt(None, 'stage-2 length in optimisation steps (overrides stage2_epochs)', low=0)
    max_steps: Optional[int] = opt(None, 'stop each stage after this many steps (tests / smoke runs); the LR schedule '
                                         'still spans the full stage, so a limited run is a prefix of the full one',
                                   low=0)


@dataclass
class OptimConfig:
    """Adam, its learning-rate schedule and the weight decay (both stages, both networks)."""
    lr: float = opt(3e-4, 'Adam learning rate (both stages, both networks)', low=0.0, low_open=True)
    lr_schedule: str = opt('paper', "'paper': linear to lr*lr_end_factor at the end; 'code': polynomial (power 1) to "
                                    "lr*lr_end_factor over the first 90% of steps, then constant; 'constant'",
                           choices=('paper', 'code', 'constant'))
    lr_end_factor: float = opt(0.01, 'final LR as a fraction of lr (paper: 3e-4 -> 3e-6)', low=0.0)
    beta1: float = opt(0.5, 'Adam beta1', low=0.0, high=1.0)
    beta2: float = opt(0.999, 'Adam beta2', low=0.0, high=1.0)
    adam_eps: float = opt(1e-5, 'Adam epsilon (TF code 1e-5)', low=0.0, low_open=True)
    fused_adam: bool = opt(True, "torch's fused Adam kernel (CPU and CUDA; same update as the per-tensor loop up to "
                                 "rounding)")
    weight_decay: float = opt(5e-5, 'L2 weight decay added to the losses: wd * 0.5 * sum(w^2) (TF l2_regularizer)',
                              low=0.0)
    weight_decay_biases: bool = opt(True, 'apply the weight decay to conv/linear biases too (not to BatchNorm)')
    bias_grad_mult: float = opt(1.0, 'multiply conv/linear bias gradients by this (the TF code uses 2.0; Adam is '
                                     'nearly invariant to it)')
    lr_scaling: str = opt('none', "lr vs the global batch (batch_size x processes): 'none' (lr as given whatever the "
                                  "batch), 'sqrt' (lr x sqrt(global batch / lr_reference_batch): the square-root rule "
                                  "for Adam) or 'linear' (lr x global batch / lr_reference_batch)",
                          choices=('none', 'sqrt', 'linear'))
    lr_reference_batch: int = opt(64, 'the global batch at which lr holds as given (lr_scaling sqrt / linear)', low=1)
    r_lr_factor: float = opt(1.0, "R's learning rate as a multiple of C's (lr)", low=0.0, low_open=True)


@dataclass
class LossConfig:
    """The weights of the terms of Eq. (3) (stage 1), L_C and L_R (stage 2); losses.py computes them."""
    ae_loss_weight: float = opt(30.0, 'stage 1: weight of the MSE reconstruction loss (code: 30)', low=0.0)
    class_loss_weight: float = opt(1.0, 'C: weight of the real-vs-corrupt cross-entropy', low=0.0)
    mask_loss_weight: float = opt(0.1, 'C: weight of the drop-mask sigmoid cross-entropy (0 = ablation (g))', low=0.0)
    adv_loss_weight: float = opt(1.0, "R: weight of the adversarial term (its form: generator_loss)", low=0.0)
    rec_loss_weight: float = opt(30.0, 'R: weight of the L2 loss on kept cells', low=0.0)
    generator_loss: str = opt('nonsaturating', "R's adversarial term: 'nonsaturating' (paper Sec. 4.4: BCE of the "
                                               "corrupt half labelled real) or 'code' (the authors' code: CE with "
                                               "swapped labels over [real; corrupt]; docs/method.md)",
                              choices=('nonsaturating', 'code'))
    r_coop_class_weight: Optional[float] = opt(None, "R: weight of C's own real-vs-corrupt CE in R's loss (the "
                                                     "authors' code: 1; paper: 0); null = class_loss_weight with "
                                                     "generator_loss code, else 0", low=0.0)
    r_coop_mask_weight: Optional[float] = opt(None, "R: weight of C's own mask CE in R's loss, which pays R to make "
                                                    "its artifacts easy to locate (code: 0.1; paper: 0); null = "
                                                    "mask_loss_weight with generator_loss code, else 0", low=0.0)
    r_cell_stats_weight: float = opt(0.0, "R: weight of the cell-statistics match (beyond the paper): per-cell "
                                          "colour mean and contrast of x_hat vs the autoencoded image on dropped "
                                          "cells, so C cannot win from brightness or contrast alone", low=0.0)

    def r_coop_weights(self) -> Tuple[float, float]:
        """(class, mask) weights of the cooperative terms in R's objective, nulls resolved."""
        code = self.generator_loss == 'code'
        cls = self.r_coop_class_weight if self.r_coop_class_weight is not None else \
            (self.class_loss_weight if code else 0.0)
        msk = self.r_coop_mask_weight if self.r_coop_mask_weight is not None else \
            (self.mask_loss_weight if code else 0.0)
        return cls, msk


@dataclass
class MethodConfig:
    """The switches of the method that Table 1's ablations turn (presets: ``ABLATIONS``)."""
    ablation: Optional[str] = opt(None, "Table 1 preset: 'baseline' (theta 0.5) or 'a'..'l' (applied before the "
                                        "config file and overrides)", verbatim=True)
    theta: float = opt(0.7, 'drop rate of the feature cells (0.7 released models; 0.5 ablation baseline)',
                       low=0.0, high=1.0)
    real_source: str = opt('autoencoded', "real examples: 'autoencoded' D(E(x)) (paper) or 'input' (ablation (a))",
                           choices=('autoencoded', 'input'))
    generator: str = opt('damage_repair', "corrupt examples: 'damage_repair' or 'gan' (ablation (l): DCGAN from "
                                          "noise)", choices=('damage_repair', 'gan'))
    repair: str = opt('distributed', "repair network: 'distributed', 'local' (b) or 'none' (k)",
                      choices=('distributed', 'local', 'none'))
    gate: bool = opt(True, 'gate repair residuals with (1 - mask) (false = ablation (i))')
    fill: str = opt('avg', "fill of dropped cells: 'avg' (3x3 average) or 'noise'", choices=('avg', 'noise'))
    encoder_kernel_size: int = opt(2, 'stride-2 encoder kernel (3 = ablation (h))', low=1)
    history: bool = opt(True, 'SimGAN history buffer of corrupt images (false = ablation (j))')
    history_batches: int = opt(50, 'history capacity in batches (capacity = history_batches x batch_size per '
                                   'process)', low=1)
    history_fraction: float = opt(0.5, 'fraction of each corrupt batch shown to C that comes from the history',
                                  low=0.0, high=1.0)
    update: str = opt('sequential', "stage-2 updates per iteration: 'sequential' (C steps, then R against the "
                                    "updated C) or 'joint' (the authors' code: both gradients at the same C, applied "
                                    "together)", choices=('sequential', 'joint'))
    r_real_half_grad: bool = opt(True, "R gets gradient from the real half of C's batch through C's batch statistics "
                                       "(BatchNorm over [real; x_hat]); false cuts that path")
    objective: Optional[str] = opt(None, "stage-2 objective preset (OBJECTIVES: 'paper', 'code', 'spot_c10_64_v2', "
                                         "'anti_shortcut'), applied after the ablation preset and before the config file "
                                         "and overrides", verbatim=True)


@dataclass
class ModelConfig:
    """Architectures of the generator, the discriminator and ablation (l)'s DCGAN."""
    gen_stem_width: int = opt(32, 'generator: stem / last decoder width', low=1)
    gen_widths: List[int] = opt([64, 128, 256, 512], 'generator: stride-2 encoder widths (4 layers -> grid '
                                                     'img_size/16)')
    leak: float = opt(0.1, 'leaky-ReLU slope of E, D, R (paper 0.1, code 0.2)', low=0.0)
    bn_momentum: float = opt(0.025, 'generator BatchNorm momentum (TF decay 0.975)', low=0.0, high=1.0)
    bn_eps: float = opt(1e-3, 'generator BatchNorm epsilon', low=0.0, low_open=True)
    generator_kwargs: Dict[str, Any] = opt({}, 'extra damage_repair_generator constructor kwargs')
    discriminator_kwargs: Dict[str, Any] = opt({}, 'extra alexnet_spot_discriminator constructor kwargs (e.g. '
                                                   'head_hidden_size)')
    gan_latent_dim: int = opt(100, 'ablation (l): DCGAN noise dimension', low=1)
    gan_width: int = opt(64, 'ablation (l): DCGAN base width', low=1)
    init_generator: Optional[str] = opt(None, 'stage 2 only runs: stage-1 generator safetensors (default: '
                                              '<output_dir>/damage_repair_generator_stage1.safetensors)', verbatim=True)


@dataclass
class RunConfig:
    """Where the run writes, how it logs and checkpoints, and how it uses the hardware."""
    seed: int = opt(0, 'seed of every random draw (crops, flips, masks, buffer picks, init, dropout)', low=0)
    output_dir: str = opt('runs/pretrain', 'run directory (weights, config, metrics, figures, checkpoints)',
                          verbatim=True)
    overwrite: bool = opt(False, 'start afresh when output_dir already holds a run (else: error unless --resume); '
                                 'the earlier run is renamed aside and deleted once the new one has a checkpoint')
    resume: Optional[str] = opt(None, "'latest' (or true): continue from output_dir/checkpoints/latest; or a "
                                      "checkpoint dir", verbatim=True)
    snapshots: List[float] = opt([], 'stage 2: also save the backbone after these fractions of the stage (e.g. '
                                     '[0, 0.25, 0.5]) as snapshots/alexnet_spot_stage2_step<N>.safetensors '
                                     '(learning curves)')
    cpu: bool = opt(False, 'train on the CPU even if an accelerator is available (multi-process CPU runs use gloo)')
    mixed_precision: str = opt('auto', "'auto' (bf16 where it is fast: GPUs with bf16, CPUs with AVX512-BF16 or "
                                       "AMX; else float32), 'no', 'bf16' or 'fp16' (Accelerate autocast; losses stay "
                                       "float32)", choices=('auto', 'no', 'bf16', 'fp16'), verbatim=True)
    channels_last: Union[bool, str] = opt('auto', "channels-last memory format for images and activations; "
                                                  "parameters stay contiguous ('auto': on with bf16 and on GPUs)",
                                          choices=(True, False, 'auto'))
    compile: bool = opt(False, "torch.compile (inductor, through Accelerate's dynamo_backend) the prepared forwards "
                               "(stage 1: D(E(x)); stage 2: C's step and R); a graph that does not compile stops the "
                               "run with dynamo's error (no silent eager fallback). Off by default: slower on this "
                               "project's CPU (benchmarks/README.md)")
    retain_freed_memory: bool = opt(True, 'CPU: keep freed tensor memory in the heap for the next step instead of '
                                          'unmapping it (glibc mallopt; train_scripts/allocator.py): large tensors '
                                          'are not page-faulted in again every step')
    threads: Optional[int] = opt(None, 'torch CPU threads per process (null: one per idle core, cores shared by the '
                                       'processes: threads beyond the idle cores slow a step down)',
                                 low=1)
    log_every: int = opt(10, 'steps between metrics.jsonl records / progress-bar updates', low=1)
    figure_every: int = opt(200, 'steps between Figure-3 grids (0: only at the end of a stage)', low=0)
    shortcut_every: int = opt(500, 'stage 2: steps between shortcut-monitor records (shortcut.py: cell statistics '
                                   "vs C, on a fixed image set; also at the end of the stage; 0: never)", low=0)
    shortcut_images: int = opt(256, 'stage 2: images in the shortcut monitor set', low=8)
    checkpoint_every: int = opt(500, 'steps between checkpoints (0: only at the end of a stage)', low=0)
    keep_checkpoints: int = opt(2, 'checkpoints kept (older ones are deleted)', low=1)
    num_figure_images: int = opt(8, 'images (columns) in the Figure-3 grid', low=1)
    tensorboard: bool = opt(False, 'also log to tensorboard (Accelerate tracker) under output_dir/tensorboard')
    progress: bool = opt(True, 'tqdm progress bars')


@dataclass
class DebugConfig:
    """Hooks for the tests."""
    debug_nan_at: Optional[str] = opt(None, "inject NaN into the input batch at 'stage:step' (tests the NaN stop; "
                                            "quote it in YAML)", verbatim=True)
    debug_step_sleep: float = opt(0.0, 'sleep this many seconds after every step (tests kill a run mid-training)',
                                  low=0.0)
    debug_dump: bool = opt(False, 'write debug/rank<r>.json: sample ids per step and parameter hashes (tests)')


SECTIONS: Tuple[Tuple[str, type], ...] = (
    ('data', DataConfig), ('augment', AugmentConfig), ('schedule', ScheduleConfig), ('optim', OptimConfig),
    ('loss', LossConfig), ('method', MethodConfig), ('model', ModelConfig), ('run', RunConfig),
    ('debug', DebugConfig))


@dataclass
class PretrainConfig:
    """Every setting of a pretraining run, by section. Build it with :func:`resolve` (or :meth:`from_flat`), which
    checks every value; ``to_flat()`` gives the flat keys back (config.yaml, checkpoint metadata)."""
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    @classmethod
    def from_flat(cls, flat: Dict[str, Any]) -> 'PretrainConfig':
        """Build and validate from flat keys (missing keys take their defaults)."""
        _check_keys(flat, 'the configuration')
        sections = {}
        for name, section_type in SECTIONS:
            values = {}
            for f in dataclasses.fields(section_type):
                if f.name in flat:
                    values[f.name] = _checked(f, copy.deepcopy(flat[f.name]))
            sections[name] = section_type(**values)
        cfg = cls(**sections)
        cfg._check_relations()
        return cfg

    def to_flat(self) -> Dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(getattr(self, name), f.name))
                for name, section_type in SECTIONS for f in dataclasses.fields(section_type)}

    def replace(self, **flat: Any) -> 'PretrainConfig':
        """A validated copy with some flat keys changed."""
        return PretrainConfig.from_flat(dict(self.to_flat(), **flat))

    # ---------------------------------------------------------------- derived values
    @property
    def grid(self) -> Tuple[int, int]:
        """The drop-mask grid, equal to the discriminator's conv5 grid."""
        return self.augment.img_size // 16, self.augment.img_size // 16

    @property
    def needs_autoencoder(self) -> bool:
        """Every run but ablation (l) with raw images as real ones uses E and D."""
        return not (self.method.generator == 'gan' and self.method.real_source == 'input')

    @property
    def stages(self) -> List[int]:
        return [1, 2] if self.schedule.stage == 'both' else [int(self.schedule.stage)]

    @property
    def nan_at(self) -> Optional[Tuple[int, int]]:
        return None if self.debug.debug_nan_at is None else parse_stage_step(self.debug.debug_nan_at, 'debug_nan_at')

    def generator_kwargs(self) -> Dict[str, Any]:
        """Constructor kwargs of ``damage_repair_generator`` (saved to model_args.json)."""
        m, model = self.method, self.model
        kwargs = dict(stem_width=model.gen_stem_width, widths=list(model.gen_widths),
                      encoder_kernel_size=m.encoder_kernel_size, leak=model.leak, theta=m.theta, fill=m.fill,
                      repair=m.repair, gate=m.gate, bn_momentum=model.bn_momentum, bn_eps=model.bn_eps)
        kwargs.update(model.generator_kwargs)
        return kwargs

    def discriminator_kwargs(self) -> Dict[str, Any]:
        """Constructor kwargs of ``alexnet_spot_discriminator``: fc6 spans the conv5 map; no mask head without mask
        loss (an unused head would get no gradient, which DDP rejects)."""
        kwargs = dict(head_kernel_size=math.ceil(self.augment.img_size / 16), mask_head=self.loss.mask_loss_weight > 0)
        kwargs.update(self.model.discriminator_kwargs)
        return kwargs

    def gan_kwargs(self) -> Dict[str, Any]:
        return dict(img_size=self.augment.img_size, latent_dim=self.model.gan_latent_dim, width=self.model.gan_width)

    # ---------------------------------------------------------------- checks across fields
    def _check_relations(self) -> None:
        size, widths = self.augment.img_size, self.model.gen_widths
        if size % 16:
            raise ConfigError(f'img_size must be a positive multiple of 16 (the drop-mask grid is img_size/16), '
                              f'got {size!r}')
        if size % (2 ** len(widths)):
            raise ConfigError(f'img_size {size} must be a multiple of the encoder stride 2**len(gen_widths) = '
                              f'{2 ** len(widths)}')
        if self.method.generator == 'damage_repair' and self.loss.mask_loss_weight > 0 and \
                size // 2 ** len(widths) != math.ceil(size / 16):
            raise ConfigError('the drop-mask grid (img_size / 2**len(gen_widths)) must equal the discriminator conv5 '
                              'grid (img_size / 16) for the mask loss: use 4 gen_widths or mask_loss_weight=0')
        for key in ('crop_scale', 'crop_ratio'):
            lo, hi = getattr(self.augment, key)
            if not 0 < lo <= hi:
                raise ConfigError(f'{key} must be [low, high] with 0 < low <= high, got {[lo, hi]!r}')
        if not all(0 <= f <= 1 for f in self.run.snapshots):
            raise ConfigError(f'snapshots must be a list of stage-2 fractions in [0, 1], got {self.run.snapshots!r}')
        if self.run.mixed_precision == 'fp16' and 2 in self.stages:
            raise ConfigError("mixed_precision fp16 cannot run stage 2: Accelerate's one GradScaler is stepped by both "
                              "the C and the R optimizer, so the loss scale would be updated twice per iteration; use "
                              "bf16 (or no), or run stage 1 alone in fp16")
        self.nan_at  # noqa: B018  (parses debug_nan_at: a malformed value is named now, not at that step)
        self._check_model_kwargs()

    def _check_model_kwargs(self) -> None:
        """Each extra model kwarg against its constructor's signature, then the model built on the meta device, now:
        a wrong discriminator_kwargs key used to fail after the whole of stage 1 (raw TypeError), leaving a run that
        neither resumed nor restarted. Imports the models (torch) only when a config sets extra kwargs."""
        import importlib
        import inspect
        for key, (model, module, cls_name) in _MODEL_CLASSES.items():
            given = getattr(self.model, key)
            if not given:
                continue
            cls = getattr(importlib.import_module(module), cls_name)
            params = inspect.signature(cls.__init__).parameters
            valid = sorted(k for k, p in params.items() if k not in ('self', 'device', 'dtype')
                           and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
            unknown = [k for k in given if k not in valid]
            if unknown:
                raise ConfigError(f'{key}: {unknown[0]!r} is not a constructor argument of {model}; valid keys: '
                                  f'{", ".join(valid)}')
            import timm
            kwargs = self.generator_kwargs() if key == 'generator_kwargs' else self.discriminator_kwargs()
            try:
                timm.create_model(model, device='meta', **kwargs)
            except Exception as e:  # noqa: BLE001  (a value the constructor rejects)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ''
                raise ConfigError(f'{key} {given!r} do not build {model}: {type(e).__name__}: {first}; fix the '
                                  f'values') from None


# ------------------------------------------------------------------------------------------------ value checks
# the models whose constructor kwargs a config may extend: config key -> (timm name, module, class)
_MODEL_CLASSES = {
    'generator_kwargs': ('damage_repair_generator', 'timm_spot.models.damage_repair_generator',
                         'DamageRepairGenerator'),
    'discriminator_kwargs': ('alexnet_spot_discriminator', 'timm_spot.models.alexnet_spot_discriminator',
                             'AlexNetSpotDiscriminator'),
}
_FIELDS: Dict[str, dataclasses.Field] = {f.name: f for _, t in SECTIONS for f in dataclasses.fields(t)}
_HINTS: Dict[str, Any] = {k: v for _, t in SECTIONS for k, v in typing.get_type_hints(t).items()}
DEFAULTS: Dict[str, Any] = PretrainConfig().to_flat()
HELP: Dict[str, str] = {k: f.metadata['help'] for k, f in _FIELDS.items()}
STRING_KEYS = tuple(k for k, f in _FIELDS.items() if f.metadata['verbatim'])

# keys that describe one invocation, not the run: never taken from a saved config.yaml on --resume
RUNTIME_KEYS = ('resume', 'max_steps', 'overwrite', 'debug_nan_at', 'debug_step_sleep', 'progress')


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked(f: dataclasses.Field, value: Any) -> Any:
    """``value`` of field ``f`` converted to its type (numbers written as YAML strings, 1 -> '1' for ``stage``,
    true -> 'latest' for ``resume``) and checked; a ConfigError names the key, the value and what it must be.
    A quoted "false" is not a boolean, 64 is not a list, abc is not a learning rate."""
    key, hint, meta, given = f.name, _HINTS[f.name], f.metadata, value
    nullable = typing.get_origin(hint) is Union and type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if nullable else hint
    if key == 'resume' and isinstance(value, bool):
        value = 'latest' if value else None
    if key == 'stage' and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None and nullable:
        return None
    if meta['choices'] is not None:
        if not any(value == c and type(value) is type(c) for c in meta['choices']):
            raise ConfigError(f'{key} must be one of {meta["choices"]}, got {given!r}')
        return value
    if base is bool:
        if not isinstance(value, bool):
            hint_text = ' (a quoted string: write true or false without quotes)' if isinstance(value, str) else ''
            raise ConfigError(f'{key} must be true or false, got {value!r}{hint_text}')
    elif base is float:
        number = value
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f'{key} must be a number, got {value!r}') from None
        if not _is_number(number) or not math.isfinite(float(number)):
            raise ConfigError(f'{key} must be a finite number, got {value!r}')
        value = float(number)
    elif base is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f'{key} must be an integer{" or null" if nullable else ""}, got {value!r}')
    elif base is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f'{key} must be a non-empty string{" or null" if nullable else ""}, got {value!r}')
    elif typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        ok = isinstance(value, (list, tuple)) and all(
            _is_number(v) and (item is float or (isinstance(v, int) and v > 0)) for v in value)
        if key in ('crop_scale', 'crop_ratio') and not (ok and len(value) == 2):
            raise ConfigError(f'{key} must be a list [low, high] of two numbers, got {value!r}')
        if key == 'gen_widths' and not (ok and value):
            raise ConfigError(f'gen_widths must be a list of positive integers (e.g. [64, 128, 256, 512]), got '
                              f'{value!r}')
        if not ok:
            raise ConfigError(f'{key} must be a list of numbers, got {value!r}')
        value = [item(v) for v in value]
    elif typing.get_origin(base) is dict and not isinstance(value, dict):
        raise ConfigError(f'{key} must be a mapping, got {value!r}')
    low, high = meta['low'], meta['high']
    if low is not None and (value < low or (value == low and meta['low_open'])):
        raise ConfigError(f'{key} must be {">" if meta["low_open"] else ">="} {low}, got {given!r}')
    if high is not None and value > high:
        raise ConfigError(f'{key} must be <= {high}, got {given!r}')
    return value


# Table 1 of the paper (STL-10 ablations). Every preset starts from the baseline (theta = 0.5).
ABLATIONS: Dict[str, Dict[str, Any]] = {
    'baseline': dict(theta=0.5),
    'a': dict(theta=0.5, real_source='input'),
    'b': dict(theta=0.5, repair='local'),
    'c': dict(theta=0.1),
    'd': dict(theta=0.3),
    'e': dict(theta=0.7),
    'f': dict(theta=0.9),
    'g': dict(theta=0.5, mask_loss_weight=0.0),
    'h': dict(theta=0.5, encoder_kernel_size=3),
    'i': dict(theta=0.5, gate=False),
    'j': dict(theta=0.5, history=False),
    'k': dict(theta=0.5, repair='none'),
    'l': dict(theta=0.5, generator='gan', real_source='input', mask_loss_weight=0.0),
}
ABLATION_NAMES = {
    'baseline': 'baseline (dropping rate 0.5)', 'a': 'input image as real', 'b': 'local repair network',
    'c': 'dropping rate 0.1', 'd': 'dropping rate 0.3', 'e': 'dropping rate 0.7', 'f': 'dropping rate 0.9',
    'g': 'without mask prediction', 'h': '3x3 encoder convolutions', 'i': 'no gating in repair layers',
    'j': 'no history of corrupted examples', 'k': 'no repair network', 'l': 'GAN instead of damage & repair',
}


# Stage-2 objectives: which weight each term of L_C and L_R gets (losses.discriminator_objective / repair_objective)
# and how C and R are updated. Terms: C's class CE, C's mask CE; R's adversarial term (form: generator_loss), R's
# kept-cell L2, R's cooperative class and mask terms (C's own losses in R's objective), R's cell-statistics match.
OBJECTIVES: Dict[str, Dict[str, Any]] = {
    # paper Sec. 4.3-4.4: non-saturating adversarial loss, mask weight 0.1, L2 weight 30, nothing cooperative;
    # the paper does not say how C and R are interleaved (this project's C-then-R)
    'paper': dict(generator_loss='nonsaturating', class_loss_weight=1.0, mask_loss_weight=0.1, adv_loss_weight=1.0,
                  rec_loss_weight=30.0, r_coop_class_weight=0.0, r_coop_mask_weight=0.0, r_cell_stats_weight=0.0,
                  update='sequential', r_real_half_grad=True),
    # the authors' TF code: R's loss sums every loss in its scope (C's class CE and 0.1 x mask CE, the swapped-label
    # CE, 30 x L2); both gradients from one forward, applied together; C's BN sees [real; corrupt] together
    'code': dict(generator_loss='code', class_loss_weight=1.0, mask_loss_weight=0.1, adv_loss_weight=1.0,
                 rec_loss_weight=30.0, r_coop_class_weight=1.0, r_coop_mask_weight=0.1, r_cell_stats_weight=0.0,
                 update='joint', r_real_half_grad=True),
    # the release spot_c10_64_v2 (beyond paper and code: mask weight 1.0 for C *and* R, C-then-R)
    'spot_c10_64_v2': dict(generator_loss='code', class_loss_weight=1.0, mask_loss_weight=1.0, adv_loss_weight=1.0,
                           rec_loss_weight=30.0, r_coop_class_weight=1.0, r_coop_mask_weight=1.0,
                           r_cell_stats_weight=0.0, update='sequential', r_real_half_grad=True),
    # a candidate beyond paper and code, aimed at the shortcut (docs/method.md): C's mask weight 1.0 as v2, R's
    # cooperative mask term at the code's 0.1, no real-half path to R, R matches the cell statistics of autoencoded
    # images; compared by probes in benchmarks/README.md ("Stage-2 objective study")
    'anti_shortcut': dict(generator_loss='code', class_loss_weight=1.0, mask_loss_weight=1.0, adv_loss_weight=1.0,
                          rec_loss_weight=30.0, r_coop_class_weight=1.0, r_coop_mask_weight=0.1,
                          r_cell_stats_weight=1.0, update='sequential', r_real_half_grad=False),
}


# ------------------------------------------------------------------------------------------------ files and flags
def parse_value(text: str) -> Any:
    """Parse a CLI value as YAML (numbers, booleans, null, lists, dicts), falling back to the raw string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _check_keys(d: Dict[str, Any], where: str) -> None:
    for key in d:
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=3)
            hint = f' (did you mean {", ".join(close)}?)' if close else ''
            raise ConfigError(f'unknown config key {key!r} in {where}{hint}; see --help for the keys')


def load_yaml(path: str) -> Dict[str, Any]:
    """The flat keys of a YAML config file (unknown keys are an error naming the file)."""
    if not os.path.isfile(path):
        raise ConfigError(f'config file {path} does not exist' if not os.path.exists(path)
                          else f'config file {path} is not a file')
    try:
        with open(path, 'r', encoding='utf-8') as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise ConfigError(f'config file {path} is not valid YAML{where}: {problem}; fix the file') from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f'cannot read config file {path}: {e}') from None
    if not isinstance(data, dict):
        raise ConfigError(f'config file {path} must hold a mapping of keys to values')
    _check_keys(data, path)
    return data


def parse_overrides(items: Iterable[str]) -> Dict[str, Any]:
    """``key=value`` strings -> flat keys."""
    out: Dict[str, Any] = {}
    for item in items or ():
        if '=' not in item:
            raise ConfigError(f'--set expects key=value, got {item!r}')
        key, value = item.split('=', 1)
        key = key.strip()
        out[key] = value if key in STRING_KEYS and value not in ('null', '~') else parse_value(value)
    _check_keys(out, '--set')
    return out


def resolve(user: Dict[str, Any], base: Optional[Dict[str, Any]] = None) -> PretrainConfig:
    """Defaults (or flat ``base``) -> ablation preset -> objective preset (each if ``user`` names one) -> ``user``
    keys; validated."""
    flat = copy.deepcopy(base if base is not None else DEFAULTS)
    ablation = user.get('ablation')  # a preset is applied only when given in this invocation's file or flags
    if ablation is not None:
        ablation = str(ablation)
        if ablation not in ABLATIONS:
            raise ConfigError(f'ablation must be one of {sorted(ABLATIONS)}, got {ablation!r}')
        flat.update(copy.deepcopy(ABLATIONS[ablation]))
    objective = user.get('objective')  # likewise, after the ablation preset
    if objective is not None:
        objective = str(objective)
        if objective not in OBJECTIVES:
            raise ConfigError(f'objective must be one of {sorted(OBJECTIVES)}, got {objective!r}')
        flat.update(copy.deepcopy(OBJECTIVES[objective]))
    flat.update(copy.deepcopy(user))
    if ablation is not None:
        flat['ablation'] = ablation
    return PretrainConfig.from_flat(flat)


def format_keys_help() -> str:
    lines = ['config keys (YAML file or --set key=value; defaults = the paper\'s ImageNet recipe):']
    for name, section_type in SECTIONS:
        lines.append(f' [{name}] {section_type.__doc__.splitlines()[0]}')
        for f in dataclasses.fields(section_type):
            lines.append(f'  {f.name} (default {DEFAULTS[f.name]!r}): {f.metadata["help"]}')
    lines.append('ablation presets (Table 1): ' + '; '.join(f'{k}: {v}' for k, v in ABLATION_NAMES.items()))
    lines.append('objective presets (stage 2): ' + '; '.join(f'{k}: {v}' for k, v in OBJECTIVES.items()))
    return '\n'.join(lines)


def dump_yaml(cfg: Union[PretrainConfig, Dict[str, Any]]) -> str:
    flat = cfg.to_flat() if isinstance(cfg, PretrainConfig) else cfg
    return yaml.safe_dump(flat, sort_keys=False, default_flow_style=None)


# ------------------------------------------------------------------------------------------------ resume
# keys a resumed run must share with the run it continues: they set tensor shapes in the checkpoint (models,
# optimizer states, history buffer), the data position (batch_size: the step -> sample mapping) or the checkpoint's
# key names (compile: torch.compile'd models save as '_orig_mod.*')
RESUME_FIXED_KEYS = ('img_size', 'batch_size', 'gen_stem_width', 'gen_widths', 'encoder_kernel_size', 'repair',
                     'generator', 'real_source', 'generator_kwargs', 'discriminator_kwargs', 'gan_latent_dim',
                     'gan_width', 'history', 'history_batches', 'compile')


def resume_fingerprint(cfg: PretrainConfig) -> Dict[str, Any]:
    """The values of :data:`RESUME_FIXED_KEYS` (plus whether C has a mask head), as stored in checkpoint metadata."""
    flat = cfg.to_flat()
    out = {k: flat[k] for k in RESUME_FIXED_KEYS}
    out['mask_loss_weight'] = float(flat['mask_loss_weight'])
    return out


def check_resume_compatible(saved: Dict[str, Any], cfg: PretrainConfig, where: str,
                            origins: Optional[Dict[str, str]] = None) -> None:
    """Raise ConfigError naming the first key whose value differs from the resumed run's (flat ``saved``).
    ``origins``: how the user set each key (``--img-size 64``, ``img_size in my.yaml``): the advice names that, and
    no option the user did not pass."""
    flat = cfg.to_flat()
    origins = origins or {}

    def undo(key: str, old: Any) -> str:
        if key in origins:
            return f'drop {origins[key]} to continue with {old!r}'
        return f'set {key} back to {old!r} to continue'
    for key in RESUME_FIXED_KEYS:
        if key not in saved:
            continue
        old, new = saved[key], flat[key]
        old = list(old) if isinstance(old, tuple) else old
        if old != new:
            raise ConfigError(
                f'--resume: {key} is {new!r} but the run being resumed ({where}) used {old!r}; {key} fixes the shape of '
                f'the checkpoint (or the data position), so it cannot change mid-run: {undo(key, old)}, or start a '
                f'new run in another --output-dir')
    if 'mask_loss_weight' in saved:
        old, new = float(saved['mask_loss_weight']) > 0, flat['mask_loss_weight'] > 0
        if old != new:
            raise ConfigError(
                f"--resume: mask_loss_weight is {flat['mask_loss_weight']!r} but the run being resumed ({where}) used "
                f"{saved['mask_loss_weight']!r}; switching the mask loss on or off adds or removes the "
                f'discriminator\'s mask head: keep it {"> 0" if old else "0"}, or start a new run in another --output-dir')


def parse_stage_step(value: Any, key: str) -> Tuple[int, int]:
    try:
        stage, step = str(value).split(':')
        return int(stage), int(step)
    except ValueError:
        raise ConfigError(f"{key} must be 'stage:step' (e.g. '2:3'), got {value!r}") from None


# ------------------------------------------------------------------------------------------------ the machine
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo: the CPUs where oneDNN's bf16 kernels beat float32."""
    try:
        with open('/proc/cpuinfo', 'r', encoding='utf-8') as f:
            flags = next((line for line in f if line.startswith('flags')), '')
    except OSError:
        return False
    return any(flag in flags.split() for flag in ('avx512_bf16', 'amx_bf16'))


def resolve_precision(run: RunConfig, device_type: str) -> Tuple[str, bool]:
    """The (mixed_precision, channels_last) a run uses on ``device_type`` ('cpu' / 'cuda' / ...), resolving 'auto'
    from what was measured fastest (benchmarks/README.md): bf16 autocast + channels_last on GPUs with bf16 and on
    CPUs with AVX512-BF16/AMX, float32 NCHW elsewhere."""
    precision = run.mixed_precision
    if precision == 'auto':
        if device_type == 'cuda':
            import torch  # lazy: this module loads without torch, so --help and config errors are instant
            precision = 'bf16' if torch.cuda.is_bf16_supported() else 'no'
        elif device_type == 'cpu':
            precision = 'bf16' if cpu_has_fast_bf16() else 'no'
        else:
            precision = 'no'
    channels_last = run.channels_last
    if channels_last == 'auto':
        channels_last = precision == 'bf16' or device_type == 'cuda'
    return precision, bool(channels_last)


def default_threads(processes_here: int = 1) -> int:
    """Torch threads per process when ``threads`` is null: :func:`timm_spot.threads.default_threads` (shared with
    the ``timm-spot`` command; imported here lazily, as importing ``timm_spot`` imports torch)."""
    from timm_spot.threads import default_threads as _default_threads
    return _default_threads(processes_here)

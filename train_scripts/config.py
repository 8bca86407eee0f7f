"""Configuration of the pretraining run: defaults, Table 1 ablation presets, YAML files and CLI overrides.

Resolution order (later wins): ``DEFAULTS`` -> ablation preset (if ``ablation`` is set anywhere) -> YAML
config file -> ``--set key=value`` / dedicated CLI flags. Values of ``--set`` are parsed as YAML
(``--set gen_widths=[8,16,32,64] --set history=false``). Unknown keys are an error (with a suggestion).
"""
from __future__ import annotations

import copy
import difflib
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import yaml

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs')
DEMO_CONFIG = os.path.join(CONFIG_DIR, 'demo.yaml')

# (key, default, help). The defaults are the paper's ImageNet recipe (spec sections 2-10); configs/*.yaml
# specialise them. Grouped for --help.
_SPEC: List[Tuple[str, Any, str]] = [
    # --- data
    ('data', 'builtin', "image source: 'builtin' (scikit-image photos), a folder, Parquet/Arrow file or glob "
                        "(relative paths resolve against the current dir), or a Hugging Face Hub dataset id"),
    ('split', 'train', 'dataset split (local files: train)'),
    ('streaming', False, 'stream the dataset (Hub ids); sharded per process with split_dataset_by_node'),
    ('image_column', 'image', 'column holding the images'),
    ('dataset_size', None, 'streaming only: images per epoch (to turn epochs into steps); null = from the '
                           'dataset info'),
    ('shuffle_buffer', 10000, 'streaming only: shuffle buffer size'),
    ('holdout_per_class', None, 'leave out the LAST n images of every class (timm_spot.data.holdout_split), so '
                                'a probe validation set is never seen in pretraining; needs holdout_label_column'),
    ('holdout_label_column', 'label', 'label column used only to find the held-out rows (labels are not trained on)'),
    ('img_size', 128, 'training crop size in px (multiple of 16: the drop-mask / conv5 grid is img_size/16)'),
    ('crop_scale', [0.333, 1.0], 'random-resized-crop area range (fraction of the image)'),
    ('crop_ratio', [0.75, 1.33], 'random-resized-crop aspect-ratio range'),
    ('interpolation', 'random', "resize: 'random' (bilinear or bicubic at random, as the code), 'bilinear', "
                                "'bicubic'"),
    ('antialias', True, 'antialias when a crop is downscaled (TF1 resize does not)'),
    ('hflip', True, 'random horizontal flip'),
    ('color_jitter', True, 'brightness +-32/255 and saturation x[0.5, 1.5] in random order (code: on)'),
    ('num_workers', 2, 'data-loading worker processes (threads when streaming); 0 = in the main process'),
    # --- schedule
    ('stage', 'both', "which stages to run: 1 (autoencoder), 2 (damage & repair vs discriminator) or both"),
    ('batch_size', 64, 'images per process per step (global batch = batch_size x processes)'),
    ('stage1_epochs', 80, 'stage-1 length in epochs (used when stage1_steps is null)'),
    ('stage2_epochs', 150, 'stage-2 length in epochs (used when stage2_steps is null)'),
    ('stage1_steps', None, 'stage-1 length in optimisation steps (overrides stage1_epochs)'),
    ('stage2_steps', None, 'stage-2 length in optimisation steps (overrides stage2_epochs)'),
    ('max_steps', None, 'stop each stage after this many steps (tests / smoke runs); the LR schedule still '
                        'spans the full stage, so a limited run is a prefix of the full one'),
    # --- optimisation
    ('lr', 3e-4, 'Adam learning rate (both stages, both networks)'),
    ('lr_schedule', 'paper', "'paper': linear to lr*lr_end_factor at the end; 'code': polynomial (power 1) to "
                             "lr*lr_end_factor over the first 90% of steps, then constant; 'constant'"),
    ('lr_end_factor', 0.01, 'final LR as a fraction of lr (paper: 3e-4 -> 3e-6)'),
    ('beta1', 0.5, 'Adam beta1'),
    ('beta2', 0.999, 'Adam beta2'),
    ('adam_eps', 1e-5, 'Adam epsilon (TF code 1e-5)'),
    ('fused_adam', True, "torch's fused Adam kernel (CPU and CUDA; same update as the per-tensor loop up to "
                         "rounding)"),
    ('weight_decay', 5e-5, 'L2 weight decay added to the losses: wd * 0.5 * sum(w^2) (TF l2_regularizer)'),
    ('weight_decay_biases', True, 'apply the weight decay to conv/linear biases too (not to BatchNorm)'),
    ('bias_grad_mult', 1.0, 'multiply conv/linear bias gradients by this (the TF code uses 2.0; Adam is '
                            'nearly invariant to it)'),
    # --- loss weights
    ('ae_loss_weight', 30.0, 'stage 1: weight of the MSE reconstruction loss (code: 30)'),
    ('class_loss_weight', 1.0, 'C: weight of the real-vs-corrupt cross-entropy'),
    ('mask_loss_weight', 0.1, 'C: weight of the drop-mask sigmoid cross-entropy (0 = ablation (g))'),
    ('adv_loss_weight', 1.0, 'R: weight of the non-saturating adversarial loss'),
    ('rec_loss_weight', 30.0, 'R: weight of the L2 loss on kept cells'),
    ('generator_loss', 'nonsaturating', "R's objective: 'nonsaturating' (paper Sec. 4.4: corrupt images labelled "
                                        "real) or 'code' (the authors' code: C's own losses plus the swapped-label "
                                        "CE, which pushes C to uncertainty on corrupt images and helps its mask head; "
                                        "docs/method.md)"),
    ('r_lr_factor', 1.0, "R's learning rate as a multiple of C's (lr)"),
    # --- method / ablations
    ('ablation', None, "Table 1 preset: 'baseline' (theta 0.5) or 'a'..'l' (applied before the config file "
                       "and overrides)"),
    ('theta', 0.7, 'drop rate of the feature cells (0.7 released models; 0.5 ablation baseline)'),
    ('real_source', 'autoencoded', "real examples: 'autoencoded' D(E(x)) (paper) or 'input' (ablation (a))"),
    ('generator', 'damage_repair', "corrupt examples: 'damage_repair' or 'gan' (ablation (l): DCGAN from noise)"),
    ('repair', 'distributed', "repair network: 'distributed', 'local' (b) or 'none' (k)"),
    ('gate', True, 'gate repair residuals with (1 - mask) (false = ablation (i))'),
    ('fill', 'avg', "fill of dropped cells: 'avg' (3x3 average) or 'noise'"),
    ('encoder_kernel_size', 2, 'stride-2 encoder kernel (3 = ablation (h))'),
    ('history', True, 'SimGAN history buffer of corrupt images (false = ablation (j))'),
    ('history_batches', 50, 'history capacity in batches (capacity = history_batches x batch_size per process)'),
    ('history_fraction', 0.5, 'fraction of each corrupt batch shown to C that comes from the history'),
    ('gen_stem_width', 32, 'generator: stem / last decoder width'),
    ('gen_widths', [64, 128, 256, 512], 'generator: stride-2 encoder widths (4 layers -> grid img_size/16)'),
    ('leak', 0.1, 'leaky-ReLU slope of E, D, R (paper 0.1, code 0.2)'),
    ('bn_momentum', 0.025, 'generator BatchNorm momentum (TF decay 0.975)'),
    ('bn_eps', 1e-3, 'generator BatchNorm epsilon'),
    ('generator_kwargs', {}, 'extra damage_repair_generator constructor kwargs'),
    ('discriminator_kwargs', {}, 'extra alexnet_spot_discriminator constructor kwargs (e.g. head_hidden_size)'),
    ('gan_latent_dim', 100, 'ablation (l): DCGAN noise dimension'),
    ('gan_width', 64, 'ablation (l): DCGAN base width'),
    ('init_generator', None, 'stage 2 only runs: stage-1 generator safetensors (default: '
                             '<output_dir>/damage_repair_generator_stage1.safetensors)'),
    # --- run
    ('snapshots', [], 'stage 2: also save the backbone after these fractions of the stage (e.g. [0, 0.25, 0.5]) '
                      'as snapshots/alexnet_spot_stage2_step<N>.safetensors (learning curves)'),
    ('seed', 0, 'seed of every random draw (crops, flips, masks, buffer picks, init, dropout)'),
    ('output_dir', 'runs/pretrain', 'run directory (weights, config, metrics, figures, checkpoints)'),
    ('overwrite', False, 'start afresh when output_dir already holds a run (else: error unless --resume); the '
                         'earlier run is renamed aside and deleted once the new one has a checkpoint'),
    ('resume', None, "'latest' (or true): continue from output_dir/checkpoints/latest; or a checkpoint dir"),
    ('cpu', False, 'train on the CPU even if an accelerator is available (multi-process CPU runs use gloo)'),
    ('mixed_precision', 'auto', "'auto' (bf16 where it is fast: GPUs with bf16, CPUs with AVX512-BF16 or AMX; "
                                "else float32), 'no', 'bf16' or 'fp16' (Accelerate autocast; losses stay float32)"),
    ('channels_last', 'auto', "channels-last memory format for the networks and images ('auto': on with bf16 "
                              "and on GPUs)"),
    ('threads', None, 'torch CPU threads per process (null: one per idle core, cores shared by the processes: '
                      'on a busy 2-core machine 2 threads ran at half the speed of 1)'),
    ('log_every', 10, 'steps between metrics.jsonl records / progress-bar updates'),
    ('figure_every', 200, 'steps between Figure-3 grids (0: only at the end of a stage)'),
    ('checkpoint_every', 500, 'steps between checkpoints (0: only at the end of a stage)'),
    ('keep_checkpoints', 2, 'checkpoints kept (older ones are deleted)'),
    ('num_figure_images', 8, 'images (columns) in the Figure-3 grid'),
    ('tensorboard', False, 'also log to tensorboard (Accelerate tracker) under output_dir/tensorboard'),
    ('progress', True, 'tqdm progress bars'),
    # --- debugging / tests
    ('debug_nan_at', None, "inject NaN into the input batch at 'stage:step' (tests the NaN stop; quote it in YAML)"),
    ('debug_step_sleep', 0.0, 'sleep this many seconds after every step (tests kill a run mid-training)'),
    ('debug_dump', False, 'write debug/rank<r>.json: sample ids per step and parameter hashes (tests)'),
]

DEFAULTS: Dict[str, Any] = {k: v for k, v, _ in _SPEC}
HELP: Dict[str, str] = {k: h for k, _, h in _SPEC}

# keys that describe one invocation, not the run: never taken from a saved config.yaml on --resume
RUNTIME_KEYS = ('resume', 'max_steps', 'overwrite', 'debug_nan_at', 'debug_step_sleep', 'progress')

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

_CHOICES = {
    'interpolation': ('random', 'bilinear', 'bicubic'),
    'lr_schedule': ('paper', 'code', 'constant'),
    'real_source': ('autoencoded', 'input'),
    'generator': ('damage_repair', 'gan'),
    'repair': ('distributed', 'local', 'none'),
    'fill': ('avg', 'noise'),
    'mixed_precision': ('auto', 'no', 'bf16', 'fp16'),
    'generator_loss': ('nonsaturating', 'code'),
}


class ConfigError(ValueError):
    """A bad configuration value or key (the message names it)."""


def parse_value(text: str) -> Any:
    """Parse a CLI value as YAML (numbers, booleans, null, lists, dicts), falling back to the raw string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _check_keys(d: Dict[str, Any], where: str) -> None:
    for key in d:
        if key not in DEFAULTS:
            close = difflib.get_close_matches(key, list(DEFAULTS), n=3)
            hint = f' (did you mean {", ".join(close)}?)' if close else ''
            raise ConfigError(f'unknown config key {key!r} in {where}{hint}; see --help for the keys')


def load_yaml(path: str) -> Dict[str, Any]:
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


# values kept verbatim from the command line (YAML would turn '1:3' into 63 and 'no' into False)
STRING_KEYS = ('data', 'split', 'image_column', 'holdout_label_column', 'output_dir', 'resume', 'init_generator', 'debug_nan_at',
               'mixed_precision', 'ablation')


def parse_overrides(items: Iterable[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items or ():
        if '=' not in item:
            raise ConfigError(f'--set expects key=value, got {item!r}')
        key, value = item.split('=', 1)
        key = key.strip()
        out[key] = value if key in STRING_KEYS and value not in ('null', '~') else parse_value(value)
    _check_keys(out, '--set')
    return out


def resolve(user: Dict[str, Any], base: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Defaults (or ``base``) -> ablation preset (if ``user`` names one) -> ``user`` keys; then validated."""
    cfg = copy.deepcopy(base if base is not None else DEFAULTS)
    ablation = user.get('ablation')  # a preset is applied only when given in this invocation's file or flags
    if ablation is not None:
        ablation = str(ablation)
        if ablation not in ABLATIONS:
            raise ConfigError(f'ablation must be one of {sorted(ABLATIONS)}, got {ablation!r}')
        cfg.update(copy.deepcopy(ABLATIONS[ablation]))
    cfg.update(copy.deepcopy(user))
    if ablation is not None:
        cfg['ablation'] = ablation
    validate(cfg)
    return cfg


BOOL_KEYS = ('streaming', 'antialias', 'hflip', 'color_jitter', 'weight_decay_biases', 'gate', 'history',
             'overwrite', 'cpu', 'tensorboard', 'progress', 'debug_dump', 'fused_adam')
# number keys (float): (key, lowest allowed, highest allowed, low bound inclusive)
_FLOAT_KEYS = (
    ('lr', 0.0, None, False), ('lr_end_factor', 0.0, None, True), ('beta1', 0.0, 1.0, True),
    ('beta2', 0.0, 1.0, True), ('adam_eps', 0.0, None, False), ('weight_decay', 0.0, None, True),
    ('bias_grad_mult', None, None, True), ('ae_loss_weight', 0.0, None, True),
    ('class_loss_weight', 0.0, None, True), ('mask_loss_weight', 0.0, None, True),
    ('adv_loss_weight', 0.0, None, True), ('rec_loss_weight', 0.0, None, True), ('theta', 0.0, 1.0, True),
    ('history_fraction', 0.0, 1.0, True), ('leak', 0.0, None, True), ('bn_momentum', 0.0, 1.0, True),
    ('bn_eps', 0.0, None, False), ('stage1_epochs', 0.0, None, True), ('stage2_epochs', 0.0, None, True),
    ('debug_step_sleep', 0.0, None, True), ('r_lr_factor', 0.0, None, False),
)
# integer keys: (key, minimum, null allowed)
_INT_KEYS = (
    ('img_size', 16, False), ('batch_size', 1, False), ('stage1_steps', 0, True), ('stage2_steps', 0, True),
    ('max_steps', 0, True), ('dataset_size', 1, True), ('shuffle_buffer', 1, False),
    ('holdout_per_class', 1, True), ('history_batches', 1, False), ('gen_stem_width', 1, False),
    ('encoder_kernel_size', 1, False), ('gan_latent_dim', 1, False), ('gan_width', 1, False), ('seed', 0, False),
    ('threads', 1, True), ('log_every', 1, False), ('figure_every', 0, False), ('checkpoint_every', 0, False),
    ('keep_checkpoints', 1, False), ('num_workers', 0, False), ('num_figure_images', 1, False),
)
_STRING_KEYS_STRICT = (('data', True), ('split', False), ('image_column', False), ('holdout_label_column', False),
                       ('output_dir', False), ('init_generator', True))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(cfg: Dict[str, Any]) -> None:
    """Strict types: a quoted "false" is not a boolean, 64 is not a list, abc is not a learning rate.

    Numbers written as YAML strings that parse as numbers (PyYAML reads ``3e-4`` without a dot as a string) are
    converted in place; anything else names the key, the value and what it must be.
    """
    for key in BOOL_KEYS:
        value = cfg[key]
        if not isinstance(value, bool):
            hint = ' (a quoted string: write true or false without quotes)' if isinstance(value, str) else ''
            raise ConfigError(f'{key} must be true or false, got {value!r}{hint}')
    for key, low, high, inclusive in _FLOAT_KEYS:
        value = cfg[key]
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f'{key} must be a number, got {cfg[key]!r}') from None
        if not _is_number(value) or not math.isfinite(float(value)):
            raise ConfigError(f'{key} must be a finite number, got {cfg[key]!r}')
        if low is not None and (value < low or (value == low and not inclusive)):
            raise ConfigError(f'{key} must be {">=" if inclusive else ">"} {low}, got {cfg[key]!r}')
        if high is not None and value > high:
            raise ConfigError(f'{key} must be <= {high}, got {cfg[key]!r}')
        cfg[key] = value
    for key, low, nullable in _INT_KEYS:
        value = cfg[key]
        if value is None and nullable:
            continue
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f'{key} must be an integer{" or null" if nullable else ""}, got {value!r}')
        if value < low:
            raise ConfigError(f'{key} must be >= {low}, got {value!r}')
        cfg[key] = value
    for key, nullable in _STRING_KEYS_STRICT:
        value = cfg[key]
        if value is None and nullable:
            continue
        if not isinstance(value, str) or not value:
            raise ConfigError(f'{key} must be a non-empty string{" or null" if nullable else ""}, got {value!r}')
    widths = cfg['gen_widths']
    if not isinstance(widths, (list, tuple)) or not widths or \
            not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ConfigError(f'gen_widths must be a list of positive integers (e.g. [64, 128, 256, 512]), got {widths!r}')
    for key in ('crop_scale', 'crop_ratio'):
        value = cfg[key]
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_number(v) for v in value):
            raise ConfigError(f'{key} must be a list [low, high] of two numbers, got {value!r}')


def validate(cfg: Dict[str, Any]) -> None:
    """Check types and ranges; raise ConfigError naming the key."""
    _check_keys(cfg, 'the configuration')
    _check_types(cfg)
    for key, choices in _CHOICES.items():
        if cfg[key] not in choices:
            raise ConfigError(f'{key} must be one of {choices}, got {cfg[key]!r}')
    if str(cfg['stage']) not in ('1', '2', 'both'):
        raise ConfigError(f"stage must be 1, 2 or both, got {cfg['stage']!r}")
    cfg['stage'] = str(cfg['stage'])
    size = cfg['img_size']
    if not isinstance(size, int) or size <= 0 or size % 16:
        raise ConfigError(f'img_size must be a positive multiple of 16 (the drop-mask grid is img_size/16), '
                          f'got {size!r}')
    if len(cfg['gen_widths']) < 1 or size % (2 ** len(cfg['gen_widths'])):
        raise ConfigError(f"img_size {size} must be a multiple of the encoder stride 2**len(gen_widths) = "
                          f"{2 ** len(cfg['gen_widths'])}")
    if cfg['generator'] == 'damage_repair' and cfg['mask_loss_weight'] > 0 and size // 2 ** len(cfg['gen_widths']) \
            != math.ceil(size / 16):
        raise ConfigError('the drop-mask grid (img_size / 2**len(gen_widths)) must equal the discriminator conv5 grid '
                          '(img_size / 16) for the mask loss: use 4 gen_widths or mask_loss_weight=0')
    if not 0.0 <= float(cfg['theta']) <= 1.0:
        raise ConfigError(f"theta (drop rate) must be in [0, 1], got {cfg['theta']!r}")
    if not isinstance(cfg['batch_size'], int) or cfg['batch_size'] < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {cfg['batch_size']!r}")
    if not 0.0 <= float(cfg['history_fraction']) <= 1.0:
        raise ConfigError(f"history_fraction must be in [0, 1], got {cfg['history_fraction']!r}")
    for key in ('stage1_steps', 'stage2_steps', 'max_steps', 'dataset_size'):
        if cfg[key] is not None and (not isinstance(cfg[key], int) or cfg[key] < 0):
            raise ConfigError(f'{key} must be a non-negative integer or null, got {cfg[key]!r}')
    for key in ('log_every', 'figure_every', 'checkpoint_every', 'keep_checkpoints', 'num_workers'):
        if not isinstance(cfg[key], int) or cfg[key] < 0:
            raise ConfigError(f'{key} must be a non-negative integer, got {cfg[key]!r}')
    if cfg['log_every'] < 1:
        raise ConfigError('log_every must be >= 1')
    if cfg['keep_checkpoints'] < 1:
        raise ConfigError('keep_checkpoints must be >= 1')
    for key in ('crop_scale', 'crop_ratio'):
        lo, hi = cfg[key]
        if not 0 < lo <= hi:
            raise ConfigError(f'{key} must be [low, high] with 0 < low <= high, got {cfg[key]!r}')
    if cfg['debug_nan_at'] is not None:
        parse_stage_step(cfg['debug_nan_at'], 'debug_nan_at')
    if cfg['resume'] is True:
        cfg['resume'] = 'latest'
    elif cfg['resume'] is False:
        cfg['resume'] = None
    if cfg['channels_last'] not in (True, False, 'auto'):
        raise ConfigError(f"channels_last must be true, false or auto, got {cfg['channels_last']!r}")
    if not isinstance(cfg['snapshots'], list) or not all(isinstance(f, (int, float)) and 0 <= f <= 1
                                                          for f in cfg['snapshots']):
        raise ConfigError(f"snapshots must be a list of stage-2 fractions in [0, 1], got {cfg['snapshots']!r}")
    for key in ('generator_kwargs', 'discriminator_kwargs'):
        if not isinstance(cfg[key], dict):
            raise ConfigError(f'{key} must be a mapping, got {cfg[key]!r}')


# keys a resumed run must share with the run it continues: they set tensor shapes in the checkpoint (models,
# optimizer states, history buffer) or the data position (batch_size: the step -> sample mapping)
RESUME_FIXED_KEYS = ('img_size', 'batch_size', 'gen_stem_width', 'gen_widths', 'encoder_kernel_size', 'repair',
                     'generator', 'real_source', 'generator_kwargs', 'discriminator_kwargs', 'gan_latent_dim',
                     'gan_width', 'history', 'history_batches')


def resume_fingerprint(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The values of :data:`RESUME_FIXED_KEYS` (plus whether C has a mask head), as stored in checkpoint metadata."""
    out = {k: copy.deepcopy(cfg[k]) for k in RESUME_FIXED_KEYS if k in cfg}
    if 'mask_loss_weight' in cfg:
        out['mask_loss_weight'] = float(cfg['mask_loss_weight'])
    return out


def check_resume_compatible(saved: Dict[str, Any], cfg: Dict[str, Any], where: str) -> None:
    """Raise ConfigError naming the first key whose value differs from the resumed run's (``saved``)."""
    for key in RESUME_FIXED_KEYS:
        if key not in saved or key not in cfg:
            continue
        old, new = saved[key], cfg[key]
        if isinstance(old, tuple):
            old = list(old)
        if isinstance(new, tuple):
            new = list(new)
        if old != new:
            raise ConfigError(
                f'--resume: {key} is {new!r} but the run being resumed ({where}) used {old!r}; {key} fixes the shape of '
                f'the checkpoint (or the data position), so it cannot change mid-run: drop the option to continue '
                f'with {old!r}, or start a new run in another --output-dir')
    if 'mask_loss_weight' in saved and 'mask_loss_weight' in cfg:
        old, new = float(saved['mask_loss_weight']) > 0, float(cfg['mask_loss_weight']) > 0
        if old != new:
            raise ConfigError(
                f"--resume: mask_loss_weight is {cfg['mask_loss_weight']!r} but the run being resumed ({where}) used "
                f"{saved['mask_loss_weight']!r}; switching the mask loss on or off adds or removes the "
                f'discriminator\'s mask head: keep it {"> 0" if old else "0"}, or start a new run in another --output-dir')


def parse_stage_step(value: Any, key: str) -> Tuple[int, int]:
    try:
        stage, step = str(value).split(':')
        return int(stage), int(step)
    except ValueError:
        raise ConfigError(f"{key} must be 'stage:step' (e.g. '2:3'), got {value!r}") from None


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in /proc/cpuinfo: the CPUs where oneDNN's bf16 kernels beat float32."""
    try:
        with open('/proc/cpuinfo', 'r', encoding='utf-8') as f:
            flags = next((line for line in f if line.startswith('flags')), '')
    except OSError:
        return False
    return any(flag in flags.split() for flag in ('avx512_bf16', 'amx_bf16'))


def resolve_precision(cfg: Dict[str, Any], device_type: str) -> Tuple[str, bool]:
    """The (mixed_precision, channels_last) a run uses on ``device_type`` ('cpu' / 'cuda' / ...), resolving 'auto'
    from what was measured fastest (benchmarks/README.md): bf16 autocast + channels_last on GPUs with bf16 and on
    CPUs with AVX512-BF16/AMX, float32 NCHW elsewhere."""
    precision = cfg['mixed_precision']
    if precision == 'auto':
        if device_type == 'cuda':
            import torch
            precision = 'bf16' if torch.cuda.is_bf16_supported() else 'no'
        elif device_type == 'cpu':
            precision = 'bf16' if cpu_has_fast_bf16() else 'no'
        else:
            precision = 'no'
    channels_last = cfg['channels_last']
    if channels_last == 'auto':
        channels_last = precision == 'bf16' or device_type == 'cuda'
    return precision, bool(channels_last)


def default_threads(processes_here: int = 1) -> int:
    """Torch threads per process when ``threads`` is null: the idle cores (cores minus the 1-minute load average,
    at least 1) shared by this machine's processes. Never more threads than free cores: oversubscribed OpenMP
    threads wait on each other."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        busy = 0.0
    idle = max(1, int(round(cores - busy)))
    return max(1, min(cores // max(1, processes_here), idle))


def generator_kwargs(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Constructor kwargs of ``damage_repair_generator`` for this config (saved to model_args.json)."""
    kwargs = dict(
        stem_width=int(cfg['gen_stem_width']),
        widths=[int(w) for w in cfg['gen_widths']],
        encoder_kernel_size=int(cfg['encoder_kernel_size']),
        leak=float(cfg['leak']),
        theta=float(cfg['theta']),
        fill=cfg['fill'],
        repair=cfg['repair'],
        gate=bool(cfg['gate']),
        bn_momentum=float(cfg['bn_momentum']),
        bn_eps=float(cfg['bn_eps']),
    )
    kwargs.update(cfg['generator_kwargs'])
    return kwargs


def discriminator_kwargs(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Constructor kwargs of ``alexnet_spot_discriminator``: fc6 spans the conv5 map; no mask head without mask loss
    (an unused head would get no gradient, which DDP rejects)."""
    kwargs = dict(head_kernel_size=math.ceil(cfg['img_size'] / 16), mask_head=float(cfg['mask_loss_weight']) > 0)
    kwargs.update(cfg['discriminator_kwargs'])
    return kwargs


def format_keys_help() -> str:
    lines = ['config keys (YAML file or --set key=value; defaults = the paper\'s ImageNet recipe):']
    for key, default, text in _SPEC:
        lines.append(f'  {key} (default {default!r}): {text}')
    lines.append('ablation presets (Table 1): ' + '; '.join(f'{k}: {v}' for k, v in ABLATION_NAMES.items()))
    return '\n'.join(lines)


def dump_yaml(cfg: Dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)

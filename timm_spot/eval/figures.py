"""Figures as PNG files (PIL only): conv1 filters (paper Fig. 7a), conv5 nearest neighbours (Fig. 8), Grad-CAM of
the real-vs-corrupt decision (Fig. 9) and the discriminator's predicted artifact map for one image (``spot``)."""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .labelled import open_image, single_thread

__all__ = [
    'colormap', 'overlay_heatmap', 'first_conv', 'filters_figure', 'neighbours_figure', 'create_discriminator',
    'discriminator_input', 'gradcam', 'gradcam_figure', 'spot_cells', 'spot_image', 'spot_figure', 'through_generator',
]

DISCRIMINATOR = 'alexnet_spot_discriminator'

# inferno-like anchors (0..1 -> RGB)
_CMAP = np.array([
    [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39],
    [252, 255, 164]], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB with an inferno-like colour map."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(_CMAP) - 1)
    lo = np.floor(v).astype(int)
    hi = np.minimum(lo + 1, len(_CMAP) - 1)
    t = (v - lo)[..., None]
    return (_CMAP[lo] * (1 - t) + _CMAP[hi] * t).round().astype(np.uint8)


def overlay_heatmap(image: Image.Image, heat: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend a [0, 1] heat map (any size; resized bilinearly to the image) over an RGB image."""
    heat = np.asarray(heat, dtype=np.float32)
    h = Image.fromarray(colormap(heat)).resize(image.size, Image.BILINEAR)
    weight = Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)
    a = alpha * (0.25 + 0.75 * np.asarray(weight, dtype=np.float32)[..., None] / 255.0)
    base = np.asarray(image.convert('RGB'), dtype=np.float32)
    out = base * (1 - a) + np.asarray(h, dtype=np.float32) * a
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _font():
    try:
        return ImageFont.load_default()
    except Exception:  # pragma: no cover
        return None


def _save(image: Image.Image, out: str) -> str:
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    image.save(out, format='PNG')
    return out


def _with_header(canvas: Image.Image, lines: Sequence[str], footer: Optional[Image.Image] = None) -> Image.Image:
    """``canvas`` under a white header of wrapped text (title, legend, caveats) and above ``footer``: a figure
    that says what it shows without the paper open."""
    font = _caption_font(12)
    probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    width = max(canvas.width, 360)
    wrapped = [w for line in lines for w in (_wrap(probe, line, font, width - 8) or [''])]
    line_h = 15
    head = 4 + line_h * len(wrapped) + 4
    foot = footer.height + 4 if footer is not None else 0
    out = Image.new('RGB', (width, head + canvas.height + foot), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(wrapped):
        draw.text((4, 4 + i * line_h), text, fill=(0, 0, 0), font=font)
    out.paste(canvas, (0, head))
    if footer is not None:
        out.paste(footer, (0, head + canvas.height + 2))
    return out


def _colorbar(width: int, low: str, high: str, height: int = 12) -> Image.Image:
    """The heat-map colour scale with its end labels."""
    font = _caption_font(12)
    bar_w = max(60, width - 8 - 2 * 110)
    out = Image.new('RGB', (max(width, bar_w + 230), height + 6), (255, 255, 255))
    ramp = colormap(np.linspace(0, 1, bar_w))[None].repeat(height, axis=0)
    out.paste(Image.fromarray(ramp), (114, 3))
    draw = ImageDraw.Draw(out)
    draw.text((4, 2), low, fill=(0, 0, 0), font=font)
    draw.text((114 + bar_w + 6, 2), high, fill=(0, 0, 0), font=font)
    return out


# ----------------------------------------------------------------------------------------------------- filters
def filter_roughness(model: nn.Module) -> float:
    """Median over conv1 filters of the mean squared difference of neighbouring taps over twice the filter's
    variance: about 1 for white noise, near 0 for smooth (edge, colour-blob) filters."""
    w = first_conv(model).weight.detach().float().cpu()
    var = w.var(dim=(1, 2, 3)).clamp_min(1e-12)
    dy = (w[:, :, 1:, :] - w[:, :, :-1, :]).pow(2).mean(dim=(1, 2, 3))
    dx = (w[:, :, :, 1:] - w[:, :, :, :-1]).pow(2).mean(dim=(1, 2, 3))
    return float(((dx + dy) / 2 / (2 * var)).median())


NOISE_ROUGHNESS = 0.7  # above this the median filter is closer to noise than to a smooth pattern


def filters_caption(model: nn.Module, per_filter: bool = True) -> List[str]:
    """Title and, when the filters look like noise, the caveat printed above the filter grid."""
    conv = first_conv(model)
    n, _, kh, kw = conv.weight.shape
    rough = filter_roughness(model)
    lines = [f'conv1 filters ({n} x {kh}x{kw} RGB), '
             + ('each contrast-stretched on its own' if per_filter else 'one contrast scale for all')
             + f'; roughness {rough:.2f} (white noise ~1, smooth filters ~0)']
    if rough > NOISE_ROUGHNESS:
        lines.append('Caveat: most filters look like noise: this training did not shape them (the paper\'s '
                     'Figure 7a shows ImageNet-trained filters); read the probes, not this picture.')
    return lines


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The input convolution: the pretrained cfg's ``first_conv``, else the first Conv2d on RGB input."""
    name = getattr(model, 'pretrained_cfg', {}).get('first_conv') if hasattr(model, 'pretrained_cfg') else None
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    if name:
        try:
            module = model.get_submodule(name)
            if isinstance(module, nn.Conv2d):
                return module
        except AttributeError:
            pass
    for module in model.modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            return module
    raise ValueError(f'{type(model).__name__} has no convolution on 3-channel input')


def filters_figure(model: nn.Module, out: str, scale: int = 4, pad: int = 1, columns: Optional[int] = None,
                   per_filter: bool = True) -> str:
    """conv1 filters as a grid of RGB patches (each contrast-stretched to [0, 1] unless ``per_filter=False``)."""
    w = first_conv(model).weight.detach().float().cpu()
    if w.shape[1] != 3:
        raise ValueError(f'first conv has {w.shape[1]} input channels, expected 3')
    n, _, kh, kw = w.shape
    if per_filter:
        lo = w.amin(dim=(1, 2, 3), keepdim=True)
        hi = w.amax(dim=(1, 2, 3), keepdim=True)
        w = (w - lo) / (hi - lo).clamp_min(1e-8)
    else:
        m = w.abs().max().clamp_min(1e-8)
        w = 0.5 + 0.5 * w / m
    cols = columns or int(math.ceil(math.sqrt(n * 1.5)))
    rows = int(math.ceil(n / cols))
    cell_h, cell_w = kh * scale + pad, kw * scale + pad
    canvas = Image.new('RGB', (cols * cell_w + pad, rows * cell_h + pad), (255, 255, 255))
    for i in range(n):
        patch = (w[i].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        patch = Image.fromarray(patch).resize((kw * scale, kh * scale), Image.NEAREST)
        r, c = divmod(i, cols)
        canvas.paste(patch, (pad + c * cell_w, pad + r * cell_h))
    return _save(_with_header(canvas, filters_caption(model, per_filter)), out)


# ------------------------------------------------------------------------------------------- nearest neighbours
def _thumb(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)


def _bordered(image: Image.Image, color, width: int = 3) -> Image.Image:
    out = Image.new('RGB', (image.width + 2 * width, image.height + 2 * width), color)
    out.paste(image, (width, width))
    return out


@torch.no_grad()
def conv5_features(model: nn.Module, images: Sequence[Image.Image], img_size: int, crop_pct: float = 1.0,
                   batch_size: int = 64) -> torch.Tensor:
    """Flattened last-tap (conv5 for alexnet_spot) feature maps, one row per image."""
    from .features import TapExtractor, _feature_info_list, eval_transform

    model.eval()
    extractor = TapExtractor(model, indices=[len(_feature_info_list(model)) - 1])
    tf = eval_transform(model, img_size, crop_pct=crop_pct)
    rows = []
    for s in range(0, len(images), batch_size):
        with single_thread():
            x = torch.stack([tf(im) for im in images[s:s + batch_size]])
        rows.append(extractor(x)[0].flatten(1))
    return torch.cat(rows)


def neighbours_figure(
        model: nn.Module,
        images: Sequence[Image.Image],
        out: str,
        queries: Optional[Sequence[int]] = None,
        num_queries: int = 6,
        k: int = 6,
        img_size: int = 128,
        thumb: int = 96,
        seed: int = 0,
        captions: Optional[Sequence[str]] = None,
) -> Tuple[str, List[List[int]]]:
    """Each row: a query image (blue border) then its ``k`` nearest neighbours by cosine similarity of conv5.

    Returns the PNG path and the neighbour indices per query.
    """
    if len(images) < 2:
        raise ValueError('need at least two images for nearest-neighbour retrieval')
    feats = F.normalize(conv5_features(model, images, img_size), dim=1)
    if queries is None:
        g = np.random.default_rng(seed)
        queries = sorted(g.choice(len(images), size=min(num_queries, len(images)), replace=False).tolist())
    k = min(k, len(images) - 1)
    sims = feats[list(queries)] @ feats.T
    font = _font()
    cap_h = 12 if captions is not None or font is not None else 0
    cell = thumb + 6
    canvas = Image.new('RGB', ((k + 1) * (cell + 4) + 4, len(queries) * (cell + cap_h + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    found = []
    for r, q in enumerate(queries):
        s = sims[r].clone()
        s[q] = -float('inf')
        nn_idx = torch.topk(s, k).indices.tolist()
        found.append(nn_idx)
        y = 4 + r * (cell + cap_h + 4)
        for c, (idx, color) in enumerate([(q, (40, 90, 230))] + [(i, (200, 200, 200)) for i in nn_idx]):
            x = 4 + c * (cell + 4)
            canvas.paste(_bordered(_thumb(images[idx], thumb), color), (x, y))
            text = captions[idx][:16] if captions is not None else ''
            if c > 0:
                text = f'{float(sims[r, idx]):.2f} {text}'.strip()
            if text and font is not None:
                draw.text((x + 2, y + cell), text, fill=(0, 0, 0), font=font)
    return _save(canvas, out), found


# ------------------------------------------------------------------------------------------------ discriminator
def _kernel_key(model_name: str) -> Optional[str]:
    """The state-dict key whose shape depends on ``head_kernel_size`` (the fc6 conv over the whole conv5 map)."""
    import timm

    shapes = []
    for k in (1, 2):
        try:
            with torch.device('meta'):
                m = timm.create_model(model_name, head_kernel_size=k)
        except Exception:  # noqa: BLE001
            m = timm.create_model(model_name, head_kernel_size=k)
        shapes.append({n: tuple(t.shape) for n, t in m.state_dict().items()})
    diff = [n for n in shapes[0] if shapes[0][n] != shapes[1].get(n)]
    return diff[0] if diff else None


def read_model_args(weights: str, model_name: str = DISCRIMINATOR) -> Tuple[Optional[dict], Optional[int]]:
    """(constructor kwargs of ``model_name``, img_size) from the ``model_args.json`` a pretraining run writes next to
    its weights, or (None, None) when there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(weights)), 'model_args.json')
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path, 'r', encoding='utf-8') as f:
            args = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'cannot read {path} (constructor args of the weights beside it): {e}; fix or remove it, '
                         f'or pass --model-args') from None
    if not isinstance(args, dict):
        raise ValueError(f'{path} must hold a JSON object (model name -> constructor args)')
    kwargs = args.get(model_name)
    size = args.get('img_size')
    return (dict(kwargs) if isinstance(kwargs, dict) else None), (int(size) if isinstance(size, int) else None)


def parse_model_args(value: Optional[str], model_name: str = DISCRIMINATOR) -> Optional[dict]:
    """``--model-args``: a JSON object or the path of a JSON file (a run's model_args.json: its ``model_name`` entry
    is taken)."""
    if value is None:
        return None
    text = value
    if os.path.isfile(value):
        with open(value, 'r', encoding='utf-8') as f:
            text = f.read()
    try:
        args = json.loads(text)
    except ValueError as e:
        raise ValueError(f'--model-args {value!r} is neither a JSON object nor a JSON file: {e}') from None
    if not isinstance(args, dict):
        raise ValueError(f'--model-args {value!r} must be a JSON object, e.g. {{"mask_head": false}}')
    if isinstance(args.get(model_name), dict):
        args = args[model_name]
    return {k: v for k, v in args.items() if k not in ('img_size', 'how_to_load')}


def create_discriminator(weights: Optional[str] = None, img_size: Optional[int] = None,
                         model_name: str = DISCRIMINATOR, seed: int = 0,
                         model_kwargs: Optional[dict] = None) -> Tuple[nn.Module, int]:
    """``alexnet_spot_discriminator`` for ``img_size`` (a multiple of 16), weights loaded; returns (model, img_size).

    Constructor kwargs: ``model_kwargs``, else the ``model_args.json`` of the run beside the weights file (so
    discriminators trained with ``mask_head=False`` or another head load), else read from the weights (fc6 kernel
    and width, whether there is a mask head). With a weights file the image size is read from it (fc6's kernel
    covers the whole conv5 map, H/16); a conflicting ``img_size`` is an error. Without weights: random init
    (seeded), ``img_size`` default 128.
    """
    import timm

    import timm_spot  # noqa: F401

    from .features import check_finite_weights

    kwargs = dict(model_kwargs or {})
    run_size = None
    kernel = kwargs.get('head_kernel_size')
    if weights:
        if not os.path.isfile(weights):
            raise FileNotFoundError(f'weights file {weights!r} does not exist')
        from timm.models import load_state_dict

        try:
            state = load_state_dict(weights)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f'cannot read weights file {weights!r}: {e}') from None
        if model_kwargs is None:
            found, run_size = read_model_args(weights, model_name)
            if found:
                kwargs = found
                kernel = kwargs.get('head_kernel_size')
        key = _kernel_key(model_name)
        if key is not None:
            match = key if key in state else next((n for n in state if n.endswith(key)), None)
            if match is None:
                raise ValueError(f'weights file {weights!r} has no {key!r}: is it an {model_name} checkpoint? '
                                 f'(keys include {sorted(state)[:4]})')
            if kernel is None:
                kernel = int(state[match].shape[-1])
            kwargs.setdefault('head_hidden_size', int(state[match].shape[0]))
        if 'mask_head' not in kwargs:
            kwargs['mask_head'] = any(k.startswith('mask_head.') or '.mask_head.' in k for k in state)
        expected = run_size or (kernel * 16 if kernel is not None else None)
        if img_size is not None and expected is not None and img_size != expected:
            raise ValueError(f'weights file {weights!r} is for {expected}px inputs (head kernel {kernel}), '
                             f'not {img_size}px')
        img_size = img_size or expected
    if kernel is None:
        img_size = img_size or 128
        if img_size % 16:
            raise ValueError(f'image size must be a multiple of 16, got {img_size}')
        kernel = img_size // 16
    img_size = img_size or kernel * 16
    if img_size % 16:
        raise ValueError(f'image size must be a multiple of 16, got {img_size}')
    torch.manual_seed(seed)
    kwargs['head_kernel_size'] = kernel
    try:
        if weights:
            model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=weights), **kwargs)
        else:
            model = timm.create_model(model_name, **kwargs)
    except (RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f'cannot build {model_name}({", ".join(f"{k}={v!r}" for k, v in kwargs.items())})'
                         f'{" from " + repr(weights) if weights else ""}: {first[:300]}; pass the constructor args '
                         f'it was trained with (--model-args JSON or the run\'s model_args.json)') from None
    if weights:
        check_finite_weights(model, weights)
    return model.eval(), img_size


def discriminator_input(images: Sequence[Image.Image], img_size: int) -> torch.Tensor:
    """Whole images resized (squashed) to ``img_size`` x ``img_size``, scaled to [-1, 1] as the pretext model expects."""
    arrays = [np.asarray(im.convert('RGB').resize((img_size, img_size), Image.BICUBIC), dtype=np.float32)
              for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (x / 127.5 - 1.0).clamp(-1, 1)


def _conv5_module(model: nn.Module) -> nn.Module:
    from .features import _feature_info_list

    info = _feature_info_list(model)
    name = info[-1]['module'] if info else 'features.act5'
    return model.get_submodule(name)


def gradcam(model: nn.Module, x: torch.Tensor, target: str = 'predicted') -> Tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM (Selvaraju et al.) of the real-vs-corrupt logit w.r.t. the conv5 map.

    ``target``: ``'real'`` (evidence for "real"), ``'corrupt'`` (evidence for "has artifacts") or ``'predicted'``
    (whichever the model decides). Returns (cams ``[B, h, w]`` in [0, 1] at conv5 resolution, real logits ``[B]``).
    """
    layer = _conv5_module(model)
    store = {}

    def hook(_m, _i, out):
        out.retain_grad()
        store['a'] = out

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)
            real_logit, _ = model.forward_pretext(x)
            if target == 'real':
                sign = torch.ones_like(real_logit)
            elif target == 'corrupt':
                sign = -torch.ones_like(real_logit)
            elif target == 'predicted':
                sign = torch.where(real_logit >= 0, 1.0, -1.0)
            else:
                raise ValueError(f'target must be real, corrupt or predicted, not {target!r}')
            model.zero_grad(set_to_none=True)
            (real_logit * sign).sum().backward()
    finally:
        handle.remove()
    a, g = store['a'].detach(), store['a'].grad.detach()
    cam = F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1))
    peak = cam.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    return cam / peak, real_logit.detach()


def gradcam_figure(model: nn.Module, images: Sequence[Image.Image], out: str, img_size: int,
                   target: str = 'predicted', tile: int = 160, columns: Optional[int] = None) -> Tuple[str, list]:
    """Grid of image pairs (image above, Grad-CAM overlay below) bordered green (judged real) or red (artifacts)."""
    x = discriminator_input(images, img_size)
    cams, logits = gradcam(model, x, target=target)
    font = _font()
    cols = columns or min(len(images), 6)
    rows = int(math.ceil(len(images) / cols))
    cell_w, cell_h = tile + 10, 2 * (tile + 6) + 16
    canvas = Image.new('RGB', (cols * cell_w + 4, rows * cell_h + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    info = []
    for i, im in enumerate(images):
        p_real = float(torch.sigmoid(logits[i]))
        color = (30, 170, 60) if p_real >= 0.5 else (220, 40, 40)
        view = im.convert('RGB').resize((tile, tile), Image.BICUBIC)
        r, c = divmod(i, cols)
        x0, y0 = 4 + c * cell_w, 4 + r * cell_h
        canvas.paste(_bordered(view, color), (x0, y0))
        canvas.paste(_bordered(overlay_heatmap(view, cams[i].numpy(), alpha=0.6), color), (x0, y0 + tile + 6))
        if font is not None:
            draw.text((x0 + 2, y0 + 2 * (tile + 6) + 1), f'p(real)={p_real:.2f}', fill=(0, 0, 0), font=font)
        info.append(dict(p_real=p_real, judged='real' if p_real >= 0.5 else 'artifacts'))
    title = {'predicted': "the discriminator's own decision", 'real': 'the class "real"',
             'corrupt': 'the class "corrupt"'}[target]
    lines = [f'Grad-CAM at conv5 of the real-vs-corrupt discriminator: evidence for {title}',
             'Top: input; bottom: its heat map (bright = strong evidence, scale below). Border green: judged real '
             '(p(real) >= 0.5); red: judged to hold artifacts.']
    figure = _with_header(canvas, lines, _colorbar(canvas.width, 'low evidence', 'high evidence'))
    return _save(figure, out), info


@torch.no_grad()
def spot_cells(model: nn.Module, image: Image.Image, img_size: int) -> Tuple[np.ndarray, float]:
    """(artifact probability per conv5 cell, shape (img_size/16, img_size/16), in [0, 1]; probability of real)."""
    x = discriminator_input([image], img_size)
    real_logit, mask_logits = model.forward_pretext(x)
    if not bool(torch.isfinite(real_logit).all()) or (mask_logits is not None and
                                                      not bool(torch.isfinite(mask_logits).all())):
        raise ValueError('the discriminator gives non-finite outputs (NaN or inf) for this image: its weights are '
                         'broken (a diverged run?); use weights from an earlier checkpoint')
    p_real = float(torch.sigmoid(real_logit.float()[0]))
    if mask_logits is None:  # trained without the mask head (ablations g, l): only p(real)
        return None, p_real
    artifact = torch.sigmoid(-mask_logits.float())  # mask logit > 0: intact; < 0: artifact
    return artifact[0, 0].numpy(), p_real


@torch.no_grad()
def spot_image(model: nn.Module, image: Image.Image, img_size: int) -> Tuple[Optional[np.ndarray], float]:
    """(artifact probability map at the image's own size, in [0, 1], or None without a mask head; p(real))."""
    cells, p_real = spot_cells(model, image, img_size)
    if cells is None:
        return None, p_real
    up = F.interpolate(torch.from_numpy(cells)[None, None], size=(image.height, image.width), mode='bilinear',
                       align_corners=False)
    return up[0, 0].numpy(), p_real


@torch.no_grad()
def through_generator(generator: nn.Module, image: Image.Image, img_size: int, damage: bool,
                      seed: int = 0) -> Tuple[Image.Image, Optional[np.ndarray]]:
    """The image as the discriminator saw it in pretraining: autoencoded (a "real" example) or damaged and
    repaired with a random drop mask (a "corrupt" example). Returns (image, dropped-cell map or None)."""
    x = discriminator_input([image], img_size)
    if damage:
        x_hat, mask = generator.damage_and_repair(x, generator=torch.Generator().manual_seed(seed))
        dropped = (1.0 - mask[0, 0]).numpy()
    else:
        x_hat, dropped = generator.autoencode(x), None
    array = ((x_hat[0].permute(1, 2, 0).clamp(-1, 1) + 1.0) * 127.5).round().byte().numpy()
    return Image.fromarray(array), dropped


def _caption_font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:  # pragma: no cover  (older Pillow: the fixed bitmap font)
        return _font()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> List[str]:
    lines, line = [], ''
    for word in text.split():
        trial = f'{line} {word}'.strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def _cells_overlay(view: Image.Image, cells: np.ndarray, alpha: float, font, numbers: bool = True) -> Image.Image:
    """``view`` with one flat colour block per cell (nearest, so the cells are visible), grid lines and, where the
    cells are large enough, each cell's value."""
    heat = np.asarray(Image.fromarray((np.clip(cells, 0, 1) * 255).astype(np.uint8)).resize(view.size, Image.NEAREST),
                      dtype=np.float32) / 255.0
    colour = colormap(heat).astype(np.float32)
    base = np.asarray(view.convert('RGB'), dtype=np.float32)
    out = Image.fromarray((base * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    gh, gw = cells.shape
    cw, ch = view.width / gw, view.height / gh
    for i in range(1, gw):
        draw.line([(round(i * cw), 0), (round(i * cw), view.height)], fill=(255, 255, 255), width=1)
    for j in range(1, gh):
        draw.line([(0, round(j * ch)), (view.width, round(j * ch))], fill=(255, 255, 255), width=1)
    if numbers and font is not None and min(cw, ch) >= 30:
        for j in range(gh):
            for i in range(gw):
                v = float(cells[j, i])
                draw.text((i * cw + 3, j * ch + 2), f'{v:.2f}', font=font,
                          fill=(0, 0, 0) if v > 0.6 else (255, 255, 255))
    return out


def spot_figure(model: nn.Module, image_path: Optional[str], out: str, img_size: int, max_side: int = 512,
                alpha: float = 0.55, image: Optional[Image.Image] = None,
                dropped: Optional[np.ndarray] = None, min_side: int = 256,
                image_caption: Optional[str] = None) -> Tuple[str, dict]:
    """The image, its predicted artifact map (one block per conv5 cell, the probability printed in it) and, for a
    damaged-and-repaired image, the true dropped cells, side by side, with a colour bar.

    Panels are resized so their longer side is between ``min_side`` and ``max_side`` pixels (small images, e.g. the
    generator's 64-px output, are enlarged with nearest-neighbour so pixels and cells stay sharp). Each panel has
    its caption in a strip below it and the numbers are in a strip of their own, so no text overlaps.
    ``dropped`` (the true dropped cells) adds how well the map finds them.
    """
    image = image if image is not None else open_image(image_path)
    cells, p_real = spot_cells(model, image, img_size)
    if cells is None:  # no mask head: the image with p(real) only
        scale = min(1.0, max_side / max(image.size))
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        view = image.resize(size, Image.BICUBIC) if size != image.size else image
        canvas = Image.new('RGB', (size[0], size[1] + 20), (255, 255, 255))
        canvas.paste(view, (0, 0))
        font = _font()
        if font is not None:
            ImageDraw.Draw(canvas).text((2, size[1] + 4), f'p(real)={p_real:.2f}  (no mask head: no artifact map)',
                                        fill=(0, 0, 0), font=font)
        return _save(canvas, out), dict(p_real=p_real, artifact_mean=None, artifact_max=None, grid=img_size // 16,
                                        img_size=img_size, mask_head=False)
    heat, _ = spot_image(model, image, img_size)
    long_side = max(image.size)
    target = min(max(long_side, min_side), max_side)
    scale = target / long_side
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.NEAREST if scale > 1 else Image.BICUBIC
    view = image.convert('RGB').resize(size, resample) if size != image.size else image.convert('RGB')
    font = _caption_font(14)
    cell_font = _caption_font(max(10, min(16, int(min(size) / cells.shape[0] / 3.2))))
    g = cells.shape[0]
    what = image_caption or 'input'
    panels = [(view, f'{what} ({image.width}x{image.height} px, scored at {img_size} px)'),
              (_cells_overlay(view, cells, alpha, cell_font),
               f'predicted artifact probability per cell ({g}x{g} conv5 cells)')]
    stats = dict(p_real=p_real, artifact_mean=float(cells.mean()), artifact_max=float(cells.max()),
                 grid=img_size // 16, img_size=img_size)
    if dropped is not None:  # cell-level agreement of the predicted map (threshold 0.5) with the true mask
        truth = np.asarray(dropped, dtype=np.float32) >= 0.5
        pred = cells >= 0.5 if cells.shape == truth.shape else \
            F.adaptive_avg_pool2d(torch.from_numpy(heat)[None, None], truth.shape)[0, 0].numpy() >= 0.5
        stats.update(dropped_cells=int(truth.sum()), cell_accuracy=float((pred == truth).mean()))
        panels.append((_cells_overlay(view, truth.astype(np.float32), alpha, cell_font, numbers=False),
                       f'true dropped cells ({int(truth.sum())} of {truth.size})'))

    gap, bar_w, margin = 12, 16, 8
    probe = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    line_h = int(font.getbbox('Ag')[3] + 4) if font is not None else 14
    captions = [_wrap(probe, c, font, size[0]) if font is not None else [] for _, c in panels]
    caption_h = max(len(c) for c in captions) * line_h + 6
    total_w = len(panels) * size[0] + (len(panels) - 1) * gap + gap + bar_w + 40
    summary = f'p(real) = {p_real:.2f}; artifact probability: mean {cells.mean():.2f}, max {cells.max():.2f}'
    if 'cell_accuracy' in stats:
        summary += (f'; true dropped cells {stats["dropped_cells"]}/{g * g}, '
                    f'cell accuracy at 0.5 {stats["cell_accuracy"]:.2f}')
    summary_lines = _wrap(probe, summary, font, total_w - 2 * margin) if font is not None else []
    height = margin + size[1] + caption_h + len(summary_lines) * line_h + margin
    canvas = Image.new('RGB', (total_w + margin, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = margin
    for (panel, _), lines in zip(panels, captions):
        canvas.paste(panel, (x, margin))
        for k, line in enumerate(lines):
            draw.text((x, margin + size[1] + 4 + k * line_h), line, fill=(0, 0, 0), font=font)
        x += size[0] + gap
    bar = colormap(np.linspace(1, 0, size[1])[:, None].repeat(bar_w, 1))
    canvas.paste(Image.fromarray(bar), (x, margin))
    if font is not None:
        draw.text((x + bar_w + 4, margin), '1', fill=(0, 0, 0), font=font)
        draw.text((x + bar_w + 4, margin + size[1] - line_h), '0', fill=(0, 0, 0), font=font)
        for k, line in enumerate(summary_lines):
            draw.text((margin, margin + size[1] + caption_h + k * line_h), line, fill=(0, 0, 0), font=font)
    return _save(canvas, out), stats

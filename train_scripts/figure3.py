"""PNG grids in the style of the paper's Figure 3.

Rows (one column per image): input x, autoencoded D(E(x)), drop mask Omega (white = kept, black = dropped),
damaged-and-repaired x_hat, decoder without repair D(phi_hat) (the damaged feature decoded directly, Figure 3
(c)). For ablation (l) the rows are the input, (autoencoded) and GAN samples. Networks run in eval mode (BN running
statistics), with a fixed mask, so successive grids are comparable.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from timm_spot.models.damage_repair_generator import upsample_mask

from .checkpoint import atomic_write

LABEL_WIDTH = 104


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(rows: Sequence[Tuple[str, torch.Tensor]], pad: int = 2, title: Optional[str] = None) -> Image.Image:
    """Rows of images ([B, 3, H, W] in [-1, 1]) with a label on the left of each row."""
    n = max(r[1].shape[0] for r in rows)
    h, w = rows[0][1].shape[-2:]
    zoom = max(1, -(-96 // max(h, 1)))  # small training sizes: nearest-neighbour zoom to >= 96 px tiles
    if zoom > 1:
        rows = [(label, F.interpolate(images.float(), scale_factor=zoom, mode='nearest')) for label, images in rows]
        h, w = h * zoom, w * zoom
    top = 14 if title else 0
    width = LABEL_WIDTH + n * (w + pad) + pad
    height = top + len(rows) * (h + pad) + pad
    canvas = Image.new('RGB', (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 1), title, fill=(0, 0, 0))
    for r, (label, images) in enumerate(rows):
        y = top + pad + r * (h + pad)
        draw.text((4, y + h // 2 - 5), label, fill=(0, 0, 0))
        arrays = _to_uint8(images)
        for c in range(arrays.shape[0]):
            canvas.paste(Image.fromarray(arrays[c]), (LABEL_WIDTH + pad + c * (w + pad), y))
    return canvas


def save_png(image: Image.Image, path: str) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format='PNG'))


@torch.no_grad()
def figure3_rows(generator, images: torch.Tensor, mask: Optional[torch.Tensor], gan=None,
                 gan_noise: Optional[torch.Tensor] = None, with_autoencoder: bool = True) -> List[Tuple[str, torch.Tensor]]:
    """The Figure-3 rows for ``images`` (eval mode is the caller's business)."""
    rows = [('input', images)]
    if generator is not None and with_autoencoder:
        rows.append(('autoencoded', generator.autoencode(images)))
    if gan is not None:
        rows.append(('GAN samples', gan(gan_noise)))
        return rows
    if generator is None or mask is None:
        return rows
    mask_img = upsample_mask(mask.float(), images.shape[-2:]).repeat(1, 3, 1, 1) * 2 - 1
    rows.append(('mask (white=kept)', mask_img))
    x_hat, _ = generator.damage_and_repair(images, mask)
    rows.append(('damaged+repaired', x_hat))
    phi_hat = generator.damage(generator.encode(images), mask)
    rows.append(('no repair D(phi^)', generator.decode(phi_hat)))
    return rows

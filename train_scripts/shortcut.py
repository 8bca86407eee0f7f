"""The shortcut monitor: can simple cell statistics do C's job?

The method wants C to win by knowing what objects look like. If damaged-and-repaired cells differ from autoencoded
ones in brightness, contrast, saturation or smoothness, a linear model on those statistics tells real from repaired
and finds dropped cells, and C has no reason to build conv3-conv5 features (docs/method.md, "Shortcuts"). This module
measures exactly that on a fixed set of images and masks, beside C's own AUCs on the same set:

* ``shortcut_image_auc``: logistic regression on per-image summaries of the cell statistics, real vs repaired;
* ``shortcut_cell_auc``: logistic regression on per-cell statistics of repaired images, dropped vs kept cells;
* ``c_image_auc`` / ``c_cell_auc``: C's real/corrupt logit and its mask head on the same images and cells.

AUCs are held out: two folds split by image, each fitted on one fold and scored on the other. A recipe is doing what
the method intends when the shortcut AUCs stay near 0.5 while C's stay high.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_spot.models.damage_repair_generator import sample_drop_mask

from .batches import TAG_SHORTCUT, figure_images, torch_generator
from .losses import STAT_NAMES, binary_auc, cell_statistics, upsample_mask  # noqa: F401 (STAT_NAMES re-exported)
from .modes import preserved_batchnorm_stats


def image_features(stats: torch.Tensor) -> torch.Tensor:
    """Per-image summary of cell statistics [B, M, N, S] -> [B, 4 S]: mean, std, min and max over the cells."""
    flat = stats.flatten(1, 2)
    return torch.cat([flat.mean(1), flat.std(1, unbiased=False), flat.amin(1), flat.amax(1)], 1)


def cell_features(stats: torch.Tensor) -> torch.Tensor:
    """Per-cell features [B * M * N, 2 S]: the cell's statistics and their difference from the image's mean."""
    rel = stats - stats.flatten(1, 2).mean(1)[:, None, None, :]
    return torch.cat([stats, rel], -1).flatten(0, 2)


def logistic_auc(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 l2: float = 1e-3, iters: int = 100) -> float:
    """Held-out AUC of an L2-regularised logistic regression (standardised features, L-BFGS)."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    w = torch.zeros(a.shape[1], requires_grad=True)
    c = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=iters, line_search_fn='strong_wolfe')
    y = train_y.float()

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(a @ w + c, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(binary_auc(b @ w + c, test_y.bool()))


def two_fold_auc(x: torch.Tensor, y: torch.Tensor, fold: torch.Tensor) -> float:
    """Mean of the two held-out AUCs, fitting on ``fold == k`` and scoring on the rest."""
    aucs = [logistic_auc(x[fold == k], y[fold == k], x[fold != k], y[fold != k]) for k in (0, 1)]
    return sum(aucs) / 2


def shortcut_aucs(x_real: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor) -> Dict[str, float]:
    """The two shortcut AUCs for autoencoded images ``x_real``, their repaired versions ``x_hat`` and the drop masks
    (1 = kept) [B, 1, M, N]; folds: even / odd images (an image's real and repaired versions share a fold)."""
    b, grid = x_real.shape[0], tuple(mask.shape[-2:])
    fold = torch.arange(b) % 2
    s_real, s_hat = cell_statistics(x_real, grid).cpu(), cell_statistics(x_hat, grid).cpu()
    img_x = torch.cat([image_features(s_real), image_features(s_hat)])
    img_y = torch.cat([torch.zeros(b), torch.ones(b)])
    cells = grid[0] * grid[1]
    cell_y = (mask.flatten(1).cpu() < 0.5).float().flatten()  # 1 = dropped
    return {'shortcut_image_auc': two_fold_auc(img_x, img_y, torch.cat([fold, fold])),
            'shortcut_cell_auc': two_fold_auc(cell_features(s_hat), cell_y, fold.repeat_interleave(cells))}


class ShortcutMonitor:
    """The shortcut AUCs and C's AUCs on a fixed set of images and drop masks (the same at every call, so the curve
    shows the recipe, not the sample)."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, chunk: int = 64) -> None:
        self.images, self.masks, self.chunk = images, masks, chunk

    @classmethod
    def for_config(cls, ds, cfg, count: int, seed: int) -> 'ShortcutMonitor':
        """The monitor set of a run: ``count`` images spread over ``ds`` (test preprocessing) and drop masks at the
        config's theta, seeded by ``seed``; on the CPU (move with :meth:`to`)."""
        images = figure_images(ds, cfg, count)
        masks = sample_drop_mask(images.shape[0], cfg.grid[0], cfg.grid[1], cfg.method.theta,
                                 generator=torch_generator(seed, TAG_SHORTCUT))
        return cls(images, masks)

    def to(self, device, memory_format=None) -> 'ShortcutMonitor':
        images = self.images.to(device)
        self.images = images if memory_format is None else images.contiguous(memory_format=memory_format)
        self.masks = self.masks.to(device)
        return self

    @torch.no_grad()
    def __call__(self, generator: nn.Module, discriminator: nn.Module, autocast) -> Dict[str, float]:
        """``generator`` (E, D, R) as in stage 2 (R's BatchNorm on batch statistics, running buffers kept); C in
        eval mode (running statistics, no dropout)."""
        reals, hats, logits, mask_logits = [], [], [], []
        c_mode = discriminator.training
        discriminator.eval()
        try:
            for i in range(0, self.images.shape[0], self.chunk):
                x, m = self.images[i:i + self.chunk], self.masks[i:i + self.chunk]
                with preserved_batchnorm_stats(generator), autocast():
                    phi = generator.encode(x)
                    x_real = generator.decode(phi).float()
                    x_hat = generator.repair_decode(generator.damage(phi, m), m).float()
                    logit, mlogit = discriminator.forward_pretext(torch.cat([x_real, x_hat]))
                reals.append(x_real)
                hats.append(x_hat)
                logits.append(logit.float())
                if mlogit is not None:
                    mask_logits.append(mlogit.float()[x.shape[0]:])
        finally:
            discriminator.train(c_mode)
        x_real, x_hat = torch.cat(reals), torch.cat(hats)
        b = x_real.shape[0]
        logit = torch.cat([l.view(2, -1) for l in logits], 1)  # row 0: real, row 1: repaired
        out = shortcut_aucs(x_real, x_hat, self.masks)
        out['c_image_auc'] = float(binary_auc(logit.flatten(), torch.arange(2 * b) < b))
        out['dropped_brightness_shift'] = dropped_cell_mean_shift(x_real, x_hat, self.masks)
        if mask_logits:
            out['c_cell_auc'] = float(binary_auc(-torch.cat(mask_logits).flatten(), (self.masks < 0.5).flatten()))
        return out


def dropped_cell_mean_shift(x_real: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean brightness of dropped cells in ``x_hat`` minus the same cells in ``x_real`` (a readable companion to
    the AUCs: > 0 means repairs are brighter)."""
    dropped = 1.0 - upsample_mask(mask, x_real.shape[-2:])
    diff = (x_hat.float() - x_real.float()).mean(1, keepdim=True)
    return float((diff * dropped).sum() / dropped.sum().clamp_min(1.0))

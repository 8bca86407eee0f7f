"""Every loss term of the recipe (paper Sec. 4.2-4.4; docs/method.md, "Equations" and "Stage-2 objectives"; the
authors' code models/AutoEncoder.py, models/SpotNet.py).

Conventions (TF ``tf.losses`` defaults, as the authors' code):

* means over elements; the TF ``weights`` argument is a multiplier in front of the mean;
* ``tf.nn.l2_loss(w) = sum(w**2) / 2``, so the weight decay term is ``wd * sum(w**2) / 2`` (gradient ``wd * w``);
* the real/corrupt head is one logit (> 0 = real), equivalent to the code's 2-way softmax.

All functions compute in float32 whatever the autocast dtype of their inputs.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F

from timm_spot.models.damage_repair_generator import upsample_mask as _upsample_mask


def reconstruction_loss(output: torch.Tensor, target: torch.Tensor, weight: float = 30.0) -> torch.Tensor:
    """Stage 1, L_auto of Eq. (3): ``weight * mean((D(E(x)) - x)**2)`` (code: ``mean_squared_error(...,
    weights=30)``)."""
    return weight * F.mse_loss(output.float(), target.float())


def weight_decay_loss(params: Iterable[torch.Tensor], weight_decay: float) -> torch.Tensor:
    """``weight_decay * sum(p**2) / 2`` over ``params`` (``slim.l2_regularizer``), added to a loss."""
    params = list(params)
    if not params or weight_decay == 0:
        device = params[0].device if params else 'cpu'
        return torch.zeros((), device=device)
    return weight_decay * 0.5 * torch.stack([p.float().pow(2).sum() for p in params]).sum()


def discriminator_class_loss(real_logits: torch.Tensor, corrupt_logits: torch.Tensor) -> torch.Tensor:
    """C's real-vs-corrupt cross-entropy, weight 1: mean over the concatenated batch [real; corrupt]
    (code: ``softmax_cross_entropy(labels_real, disc_out)`` over 2B examples), i.e.
    ``0.5 * (mean BCE(real, 1) + mean BCE(corrupt, 0))`` for equal halves."""
    logits = torch.cat([real_logits.float(), corrupt_logits.float()])
    target = torch.cat([torch.ones_like(real_logits, dtype=torch.float32),
                        torch.zeros_like(corrupt_logits, dtype=torch.float32)])
    return F.binary_cross_entropy_with_logits(logits, target)


def mask_loss(real_mask_logits: torch.Tensor, corrupt_mask_logits: torch.Tensor,
              corrupt_masks: torch.Tensor) -> torch.Tensor:
    """C's drop-mask loss (unweighted; the recipe multiplies it by 0.1): sigmoid cross-entropy between the mask
    logits and Omega (1 = kept) on corrupt images, all-ones target on real images, mean over every cell of both
    halves (code: ``sigmoid_cross_entropy(drop_label, drop_pred)``)."""
    logits = torch.cat([real_mask_logits.float(), corrupt_mask_logits.float()])
    target = torch.cat([torch.ones_like(real_mask_logits, dtype=torch.float32), corrupt_masks.float()])
    return F.binary_cross_entropy_with_logits(logits, target)


def generator_adversarial_loss(corrupt_logits: torch.Tensor) -> torch.Tensor:
    """R's non-saturating adversarial loss, weight 1: mean BCE(C(x_hat), real) = mean softplus(-logit).

    (The code averages the same term over [real; corrupt] with the real half labelled corrupt; the real half
    carries no gradient to R, so the code's gradient is half of this one.)
    """
    return F.binary_cross_entropy_with_logits(corrupt_logits.float(), torch.ones_like(corrupt_logits,
                                                                                      dtype=torch.float32))


def upsample_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """The cell mask [B, 1, M, N] at pixel resolution, float32 (the generator's nearest-neighbour upsampler)."""
    return _upsample_mask(mask.float(), size)


def kept_cells_l2_loss(x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unweighted L2 between x_hat and x on KEPT cells only (the recipe multiplies it by 30).

    Code: ``mean_squared_error(x, x_hat, weights=30 * rec_weights)`` with TF's SUM_BY_NONZERO_WEIGHTS reduction:
    ``sum(m * (x_hat - x)**2) / (number of kept pixels x channels)``, m = mask upsampled to pixels. 0 when every
    cell was dropped.
    """
    m = upsample_mask(mask, x.shape[-2:])
    sq = (x_hat.float() - x.float()).pow(2) * m
    denom = (m.sum() * x.shape[1]).clamp_min(1.0)
    return sq.sum() / denom


STAT_NAMES = ('mean_r', 'mean_g', 'mean_b', 'contrast', 'saturation', 'laplacian')


def cell_statistics(images: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Per-cell statistics of images in [-1, 1]: [B, M, N, 6] = RGB mean, luminance std (contrast), mean saturation
    (max - min over RGB), RMS of the luminance Laplacian (smoothness), for an M x N grid of equal cells."""
    x = images.float()
    lum = x.mean(1, keepdim=True)
    sat = x.amax(1, keepdim=True) - x.amin(1, keepdim=True)
    kernel = torch.tensor([[0., 1., 0.], [1., -4., 1.], [0., 1., 0.]], device=x.device).view(1, 1, 3, 3)
    lap = F.conv2d(F.pad(lum, (1, 1, 1, 1), mode='replicate'), kernel)
    pool = lambda t: F.adaptive_avg_pool2d(t, grid)  # noqa: E731  (cells tile the image: img_size / grid)
    mean_rgb = pool(x)
    contrast = (pool(lum ** 2) - pool(lum) ** 2).clamp_min(0).add(1e-6).sqrt()  # eps: finite gradient at 0
    stats = torch.cat([mean_rgb, contrast, pool(sat), pool(lap ** 2).add(1e-6).sqrt()], 1)  # [B, 6, M, N]
    return stats.permute(0, 2, 3, 1)



def cell_statistics_loss(x_hat: torch.Tensor, x_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R's cell-statistics match (beyond the paper; config ``r_cell_stats_weight``): over the DROPPED cells of the
    batch, the mean and the standard deviation of each :func:`cell_statistics` of ``x_hat`` against those of the same
    cells of the autoencoded ``x_ref`` (no gradient), in units of the reference's spread. A population match, not a
    per-cell target: R need not guess what was dropped, only stop repairs from being brighter, flatter or greyer than
    autoencoded cells on average, the cues a linear model finds. 0 with fewer than two dropped cells."""
    grid = tuple(mask.shape[-2:])
    dropped = (mask.float() < 0.5).squeeze(1)  # [B, M, N]
    if int(dropped.sum()) < 2:
        return torch.zeros((), device=x_hat.device)
    hat = cell_statistics(x_hat, grid)[dropped]  # [cells, S]
    ref = cell_statistics(x_ref.detach(), grid)[dropped]
    scale = ref.std(0).clamp_min(1e-3)
    return (((hat.mean(0) - ref.mean(0)) / scale).pow(2) + ((hat.std(0) - ref.std(0)) / scale).pow(2)).mean()


def discriminator_objective(real_logits: torch.Tensor, corrupt_logits: torch.Tensor,
                            real_mask_logits: Optional[torch.Tensor], corrupt_mask_logits: Optional[torch.Tensor],
                            corrupt_masks: Optional[torch.Tensor], class_weight: float = 1.0,
                            mask_weight: float = 0.1) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """L_C, C's objective (paper Sec. 4.3: C's side of Eq. (4), max over C, plus L_mask, Eq. (5); docs/method.md):
    ``class_weight * CE(real vs corrupt) + mask_weight * sigmoid-CE(mask logits, Omega)`` (weight decay is added
    by the trainer). No mask term without mask logits or masks (ablations g, l). Returns the total and its parts
    ``c_class``, ``c_mask``."""
    cls = discriminator_class_loss(real_logits, corrupt_logits)
    if mask_weight > 0 and corrupt_mask_logits is not None and corrupt_masks is not None:
        msk = mask_loss(real_mask_logits, corrupt_mask_logits, corrupt_masks)
    else:
        msk = torch.zeros((), device=real_logits.device)
    return class_weight * cls + mask_weight * msk, {'c_class': cls, 'c_mask': msk}


def repair_objective(real_logits: torch.Tensor, corrupt_logits: torch.Tensor,
                     real_mask_logits: Optional[torch.Tensor], corrupt_mask_logits: Optional[torch.Tensor],
                     x_hat: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor], kind: str = 'nonsaturating',
                     adv_weight: float = 1.0, rec_weight: float = 30.0, coop_class_weight: float = 0.0,
                     coop_mask_weight: float = 0.0, cell_stats_weight: float = 0.0,
                     x_ref: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """L_R, the repair network's objective (paper Sec. 4.3-4.4: R's side of Eq. (4), min over R, plus the L2 on kept
    cells of Sec. 4.4; docs/method.md), from C's outputs on [real; x_hat]. Four named terms:

    ``adv_weight * adversarial + rec_weight * L2(kept cells)
    + coop_class_weight * CE(true labels) + coop_mask_weight * mask sigmoid-CE``
    (+ ``cell_stats_weight * cell_statistics_loss(x_hat, x_ref, mask)``, beyond the paper)

    * adversarial, ``kind='nonsaturating'`` (paper): BCE(C(x_hat), real) over the corrupt half;
      ``kind='code'`` (the authors' code): CE with swapped labels over [real; corrupt];
    * the two cooperative terms are C's own losses (the authors' code sums every loss in R's scope, so R's total
      contains ``L_C`` with C's weights). With ``code`` and ``coop_class_weight`` 1 the class terms give a corrupt
      logit the gradient ``sigmoid(l) - 1/2`` (up to scale): R makes C *uncertain* instead of fooling it; the mask
      term pays R to make its artifacts easier to locate.

    Which half reaches R: the real-half terms depend on x_hat only through C's batch statistics (C normalises
    [real; x_hat] together in train mode); the caller detaches the real-half logits to cut that path
    (``r_real_half_grad: false``). ``mask`` None = no kept-cell term (the GAN of ablation (l)). Returns the total
    (without weight decay) and its parts ``r_adv``, ``r_rec`` (and ``r_coop``, ``r_coop_class``, ``r_coop_mask``,
    ``r_cell_stats`` when weighted).
    """
    zero = torch.zeros((), device=x_hat.device)
    rec = kept_cells_l2_loss(x_hat, x, mask) if mask is not None else zero
    if kind == 'nonsaturating':
        adv = generator_adversarial_loss(corrupt_logits)
    elif kind == 'code':
        adv = discriminator_class_loss(corrupt_logits, real_logits)  # swapped labels, mean over 2B
    else:
        raise ValueError(f"generator_loss must be 'nonsaturating' or 'code', got {kind!r}")
    parts: Dict[str, torch.Tensor] = {'r_adv': adv, 'r_rec': rec}
    total = adv_weight * adv + rec_weight * rec
    if coop_class_weight > 0 or coop_mask_weight > 0:  # C's objective at R's weights (same sum order as L_C)
        coop, coop_parts = discriminator_objective(real_logits, corrupt_logits, real_mask_logits, corrupt_mask_logits,
                                                   mask, coop_class_weight, coop_mask_weight)
        parts.update(r_coop=coop, r_coop_class=coop_parts['c_class'], r_coop_mask=coop_parts['c_mask'])
        total = coop + total
    if cell_stats_weight > 0 and mask is not None and x_ref is not None:
        parts['r_cell_stats'] = cell_statistics_loss(x_hat, x_ref, mask)
        total = total + cell_stats_weight * parts['r_cell_stats']
    return total, parts


@torch.no_grad()
def discriminator_accuracies(real_logits: torch.Tensor, corrupt_logits: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Fraction of real images classified real (logit > 0) and of corrupt ones classified corrupt."""
    return {
        'acc_real': (real_logits.float() > 0).float().mean(),
        'acc_corrupt': (corrupt_logits.float() < 0).float().mean(),
    }


@torch.no_grad()
def mask_accuracies(real_mask_logits: torch.Tensor, corrupt_mask_logits: torch.Tensor,
                    corrupt_masks: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Mask-prediction accuracy on corrupt images (all cells), on real images (target: kept), and the recall of
    dropped cells on corrupt images (the interesting part when most cells are dropped)."""
    pred_kept = corrupt_mask_logits.float() > 0
    target_kept = corrupt_masks > 0.5
    dropped = (~target_kept).float()
    return {
        'mask_auc': binary_auc(-corrupt_mask_logits.float().flatten(), (~target_kept).flatten()),
        'mask_acc': (pred_kept == target_kept).float().mean(),
        'mask_acc_real': (real_mask_logits.float() > 0).float().mean(),
        'mask_recall_dropped': ((~pred_kept).float() * dropped).sum() / dropped.sum().clamp_min(1.0),
    }


@torch.no_grad()
def binary_auc(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of ``scores`` for the boolean ``positives`` (Mann-Whitney U with average ranks for
    ties; 0.5 when one class is absent): threshold-free, so a head stuck near its prior still shows what it ranks."""
    n_pos = positives.sum()
    n_neg = positives.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.tensor(0.5, device=scores.device)
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, device=scores.device, dtype=scores.dtype)
    uniq, inverse = torch.unique(scores, return_inverse=True)
    if uniq.numel() < scores.numel():  # average ranks over ties
        sums = torch.zeros_like(uniq).index_add_(0, inverse, ranks)
        counts = torch.zeros_like(uniq).index_add_(0, inverse, torch.ones_like(ranks))
        ranks = (sums / counts)[inverse]
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)

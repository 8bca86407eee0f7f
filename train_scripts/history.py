"""History of corrupt examples (paper ablation (j); Shrivastava et al. 2017, "SimGAN").

Each discriminator update sees ``B`` corrupt images: ``round(fraction * B)`` of them (half by default), at random
positions of the batch, are replaced by images drawn uniformly from a buffer of past corrupt images, together
with their drop masks (the mask loss needs the mask each image was made with). The buffer is then refreshed with
images of the current batch: while it is not full every current image is appended; once full, as many random
slots as were drawn are overwritten by random current images. All picks come from a seeded ``torch.Generator``.

The buffer is per process (each keeps the history of its own shard) and is saved in checkpoints.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


class HistoryBuffer:
    def __init__(self, capacity: int, fraction: float = 0.5, enabled: bool = True) -> None:
        self.capacity = int(capacity) if enabled else 0
        self.fraction = float(fraction)
        self.images: Optional[torch.Tensor] = None
        self.masks: Optional[torch.Tensor] = None
        self.size = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def clear(self) -> None:
        self.images = self.masks = None
        self.size = 0

    def _allocate(self, images: torch.Tensor, masks: torch.Tensor) -> None:
        self.images = images.new_empty((self.capacity,) + tuple(images.shape[1:]))
        self.masks = masks.new_empty((self.capacity,) + tuple(masks.shape[1:]))

    @torch.no_grad()
    def mix(self, images: torch.Tensor, masks: torch.Tensor,
            generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Corrupt batch for C: ``(images, masks, from_history)``; ``from_history`` is a bool [B] marking the
        positions taken from the buffer. ``images`` / ``masks`` must be detached; they are not modified."""
        batch, draws = images.shape[0], generator.device  # picks are drawn where the generator lives (no host trip)
        from_history = torch.zeros(batch, dtype=torch.bool, device=draws)
        if not self.enabled:
            return images, masks, from_history
        if self.images is None:
            self._allocate(images, masks)
        k = int(round(self.fraction * batch))
        out_images, out_masks = images, masks
        if self.size > 0 and k > 0:
            positions = torch.randperm(batch, generator=generator, device=draws)[:k]
            slots = torch.randint(0, self.size, (k,), generator=generator, device=draws)
            out_images, out_masks = images.clone(), masks.clone()
            dev = images.device
            out_images[positions.to(dev)] = self.images[slots.to(self.images.device)].to(dev, images.dtype)
            out_masks[positions.to(dev)] = self.masks[slots.to(self.masks.device)].to(dev, masks.dtype)
            from_history[positions] = True
        self._refresh(images, masks, max(k, 1), generator)
        return out_images, out_masks, from_history

    def _refresh(self, images: torch.Tensor, masks: torch.Tensor, count: int, generator: torch.Generator) -> None:
        batch = images.shape[0]
        if self.size < self.capacity:
            take = min(batch, self.capacity - self.size)
            self.images[self.size:self.size + take] = images[:take].to(self.images.dtype)
            self.masks[self.size:self.size + take] = masks[:take].to(self.masks.dtype)
            self.size += take
            return
        count = min(count, batch, self.capacity)
        slots = torch.randperm(self.capacity, generator=generator, device=generator.device)[:count]
        current = torch.randperm(batch, generator=generator, device=generator.device)[:count]
        slots, current = slots.to(self.images.device), current.to(images.device)
        self.images[slots] = images[current].to(self.images.dtype)
        self.masks[slots] = masks[current].to(self.masks.dtype)

    def state_dict(self) -> Dict[str, object]:
        if self.images is None or self.size == 0:
            return {'size': 0, 'capacity': self.capacity}
        return {'size': self.size, 'capacity': self.capacity,
                'images': self.images[:self.size].detach().cpu().clone(),
                'masks': self.masks[:self.size].detach().cpu().clone()}

    def load_state_dict(self, state: Dict[str, object], device: Optional[torch.device] = None) -> None:
        self.clear()
        size = int(state.get('size', 0))
        if size == 0 or not self.enabled:
            return
        images, masks = state['images'], state['masks']
        if device is not None:
            images, masks = images.to(device), masks.to(device)
        self._allocate(images, masks)
        size = min(size, self.capacity)
        self.images[:size] = images[:size]
        self.masks[:size] = masks[:size]
        self.size = size

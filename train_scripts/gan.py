"""A small DCGAN generator (Radford et al. 2016) for Table 1 ablation (l): "GAN instead of damage & repair".

z [B, latent_dim] ~ N(0, 1) -> linear -> [8w, S/16, S/16] -> BN -> ReLU -> four (4x4, stride 2) transposed convs
(8w -> 4w -> 2w -> w -> 3), BN + ReLU between, tanh at the end: images [B, 3, S, S] in [-1, 1] at the training size
S (a multiple of 16). DCGAN init: conv weights N(0, 0.02), BN weights N(1, 0.02).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class DCGANGenerator(nn.Module):
    def __init__(self, img_size: int = 128, latent_dim: int = 100, width: int = 64, out_chans: int = 3) -> None:
        super().__init__()
        if img_size % 16:
            raise ValueError(f'img_size must be a multiple of 16, got {img_size}')
        self.img_size, self.latent_dim, self.width = img_size, latent_dim, width
        self.base = img_size // 16
        chs = [8 * width, 4 * width, 2 * width, width]
        self.project = nn.Linear(latent_dim, chs[0] * self.base * self.base, bias=False)
        self.bn0 = nn.BatchNorm2d(chs[0])
        layers = []
        for cin, cout in zip(chs[:-1], chs[1:]):
            layers += [nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(chs[-1], out_chans, 4, 2, 1, bias=True), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, (nn.ConvTranspose2d, nn.Linear)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def sample_noise(self, batch_size: int, generator: torch.Generator = None) -> torch.Tensor:
        return torch.randn(batch_size, self.latent_dim, generator=generator)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.project(z).view(z.shape[0], -1, self.base, self.base)
        x = torch.relu(self.bn0(x))
        return self.net(x)

"""Figures readable without the paper (the conv1 grid says when its filters look like noise, Grad-CAM has a title,
a legend and a colour scale) and pretrain.py --help naming every shipped config."""
import pytest
import timm
import torch
from PIL import Image

import timm_spot  # noqa: F401
from timm_spot.cli import main
from timm_spot.eval import figures


def test_filters_caveat_only_for_noise_like_filters(tmp_path):
    model = timm.create_model('alexnet_spot')  # random init: noise
    assert figures.filter_roughness(model) > 0.9
    lines = figures.filters_caption(model)
    assert lines[0].startswith('conv1 filters (96 x 11x11 RGB)') and 'look like noise' in lines[1]
    conv = figures.first_conv(model)
    with torch.no_grad():  # smooth ramps: no caveat
        ramp = torch.linspace(-1, 1, 11)
        conv.weight.copy_((ramp[None, :] + ramp[:, None]).expand_as(conv.weight) *
                          torch.randn(96, 3, 1, 1))
    assert figures.filter_roughness(model) < 0.1
    assert len(figures.filters_caption(model)) == 1
    out = figures.filters_figure(model, str(tmp_path / 'f.png'), scale=4)
    with Image.open(out) as im:
        assert im.height > 8 * (11 * 4 + 1) + 1 + 12  # the grid plus a header


def test_filters_cli_prints_the_caveat(tmp_path, capsys):
    assert main(['--threads', '1', 'figure', 'filters', '--out', str(tmp_path / 'c.png')]) == 0
    assert 'look like noise' in capsys.readouterr().out


def test_gradcam_has_title_legend_and_colour_scale(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('alexnet_spot_discriminator', head_kernel_size=4).eval()
    images = [Image.new('RGB', (64, 64), (40 * i, 90, 160)) for i in range(3)]
    out, info = figures.gradcam_figure(model, images, str(tmp_path / 'gc.png'), 64, tile=64)
    with Image.open(out) as im:
        rgb = im.convert('RGB')
    cell_h = 2 * (64 + 6) + 16
    assert rgb.height > cell_h + 4 + 2 * 15 + 12  # header lines and the colour bar
    # the colour bar's ends are the colour map's ends
    bottom = [rgb.getpixel((x, rgb.height - 8)) for x in range(rgb.width)]
    assert tuple(figures.colormap(0.0).tolist()) in bottom and tuple(figures.colormap(1.0).tolist()) in bottom
    assert len(info) == 3


@pytest.mark.slow
def test_pretrain_help_lists_every_shipped_config():
    import os
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(repo, 'train_scripts', 'pretrain.py'), '--help'],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, COLUMNS='400'))
    assert r.returncode == 0
    shipped = [f for f in os.listdir(os.path.join(repo, 'train_scripts', 'configs')) if f.endswith('.yaml')]
    assert len(shipped) >= 6 and all(f in r.stdout for f in shipped), r.stdout

"""``timm-spot`` figure commands and ``spot`` write PNGs; unreadable images and bad labels give clear errors."""
import io
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import timm_spot  # noqa: F401
from timm_spot.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from conftest import DATA_ROOT  # noqa: E402  ($TIMM_SPOT_DATA, default <repo>/../shared/data)

SHARED = str(DATA_ROOT)
SAMPLES = os.path.join(SHARED, 'imagenet-samples', 'samples_160.parquet')
CIFAR = os.path.join(SHARED, 'cifar10', 'train.parquet')


def _png(path):
    with Image.open(path) as im:
        assert im.format == 'PNG'
        return im.size


def _photo(tmp_path, name='photo.jpg'):
    """A real photograph as a JPEG file: an ImageNet sample when the shared data is there, else scikit-image's."""
    path = str(tmp_path / name)
    if os.path.isfile(SAMPLES):
        import pyarrow.parquet as pq

        cell = pq.read_table(SAMPLES, columns=['image']).slice(3, 1).column('image')[0].as_py()
        Image.open(io.BytesIO(cell['bytes'])).convert('RGB').save(path, quality=92)
    else:
        import skimage.data

        Image.fromarray(skimage.data.chelsea()).save(path, quality=92)
    return path


def _discriminator_weights(tmp_path, img_size=64):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model('alexnet_spot_discriminator', head_kernel_size=img_size // 16)
    path = str(tmp_path / f'disc{img_size}.safetensors')
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def test_figure_filters(tmp_path, capsys):
    from safetensors.torch import save_file

    out = str(tmp_path / 'conv1.png')
    assert main(['figure', 'filters', '--out', out]) == 0
    w, h = _png(out)
    assert w > 11 * 4 * 8 and h > 11 * 4 * 6  # 96 filters of 11x11 at 4x in a 12 x 8 grid
    torch.manual_seed(1)
    model = timm.create_model('alexnet_spot', num_classes=0)
    save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    out2 = str(tmp_path / 'conv1_w.png')
    assert main(['figure', 'filters', '--weights', str(tmp_path / 'w.safetensors'), '--out', out2, '--scale', '2']) == 0
    assert _png(out2) < (w, h)
    assert 'wrote' in capsys.readouterr().out


def test_figure_neighbors(tmp_path):
    out = str(tmp_path / 'nn.png')
    data = SAMPLES if os.path.isfile(SAMPLES) else 'builtin'
    assert main(['figure', 'neighbors', '--data', data, '--max-images', '24', '--num-queries', '3', '-k', '4',
                 '--img-size', '64', '--out', out]) == 0
    w, h = _png(out)
    assert w > 5 * 96 and h > 3 * 96


@pytest.mark.slow
def test_figure_neighbors_builtin_default_images(tmp_path):
    from timm_spot.eval.figures import neighbours_figure
    from timm_spot.eval.features import create_backbone
    from timm_spot.data import builtin_sample_images, decode_image

    ds = builtin_sample_images()
    images = [decode_image(ds[i]['image']) for i in range(min(8, len(ds)))]
    out, found = neighbours_figure(create_backbone('alexnet_spot'), images, str(tmp_path / 'b.png'), queries=[0, 1],
                                   k=3, img_size=64)
    assert len(found) == 2 and all(len(f) == 3 and q not in f for q, f in zip([0, 1], found))
    _png(out)


@pytest.mark.slow
def test_figure_gradcam(tmp_path, capsys):
    out = str(tmp_path / 'gc.png')
    photos = [_photo(tmp_path, 'a.jpg'), _photo(tmp_path, 'b.png')]
    assert main(['figure', 'gradcam', *photos, '--img-size', '64', '--out', out]) == 0
    _png(out)
    # weights file: the image size comes from the fc6 kernel stored in it
    weights = _discriminator_weights(tmp_path, 64)
    out2 = str(tmp_path / 'gc2.png')
    assert main(['figure', 'gradcam', *photos, '--weights', weights, '--out', out2, '--target', 'real']) == 0
    assert 'at 64px' in capsys.readouterr().out
    assert main(['figure', 'gradcam', *photos, '--weights', weights, '--img-size', '128', '--out', out2]) == 2
    assert 'for 64px inputs' in capsys.readouterr().err


def test_gradcam_maps_are_normalised():
    from timm_spot.eval.figures import create_discriminator, discriminator_input, gradcam

    model, size = create_discriminator(None, 64)
    x = discriminator_input([Image.new('RGB', (80, 60), (120, 30, 200)), Image.new('RGB', (50, 50), (5, 5, 5))], size)
    assert x.shape == (2, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    cams, logits = gradcam(model, x)
    assert cams.shape == (2, 4, 4) and logits.shape == (2,)
    assert float(cams.min()) >= 0 and float(cams.max()) <= 1 + 1e-6


@pytest.mark.slow
def test_spot_real_image(tmp_path, capsys):
    photo = _photo(tmp_path)
    weights = _discriminator_weights(tmp_path, 64)
    out = str(tmp_path / 'spot.png')
    assert main(['spot', photo, '--weights', weights, '--out', out]) == 0
    w, h = _png(out)
    src = Image.open(photo).size
    assert h >= min(512, src[1]) and w > 2 * min(512, src[0])  # image | overlay | colour bar
    text = capsys.readouterr().out
    assert 'p(real)=' in text and '4x4 cells at 64px' in text
    # default output name next to the image, random weights
    assert main(['spot', photo, '--img-size', '64']) == 0
    assert os.path.isfile(os.path.splitext(photo)[0] + '_spot.png')


@pytest.mark.slow
def test_spot_through_the_generator_scores_the_true_mask(tmp_path, capsys):
    """--generator/--damage: the image is damaged & repaired as in pretraining, the map is scored per cell."""
    import timm
    from safetensors.torch import save_file

    photo = _photo(tmp_path)
    weights = _discriminator_weights(tmp_path, 64)
    gen_path = str(tmp_path / 'generator.safetensors')
    gen = timm.create_model('damage_repair_generator')
    save_file({k: v.contiguous() for k, v in gen.state_dict().items()}, gen_path)
    out = str(tmp_path / 'spot_damaged.png')
    assert main(['spot', photo, '--weights', weights, '--generator', gen_path, '--damage', '--out', out]) == 0
    text = capsys.readouterr().out
    assert 'true dropped cells' in text and 'cell accuracy' in text and os.path.isfile(out)
    # three panels (image | map | true cells) of the 64-px generator output, enlarged to >= 256 px, plus captions
    w, h = _png(out)
    assert w >= 3 * 256 and h >= 256 + 30
    assert main(['spot', photo, '--weights', weights, '--generator', gen_path, '--out', out]) == 0
    assert 'true dropped cells' not in capsys.readouterr().out  # autoencoded only: no mask to score


def test_spot_map_matches_mask_logits(tmp_path):
    """The overlay's map is sigmoid(-mask_logits), upsampled: 'artifact' where the mask head says 'dropped'."""
    from timm_spot.eval.figures import create_discriminator, spot_image

    model, size = create_discriminator(None, 64)
    with torch.no_grad():
        model.mask_head.weight.zero_()
        model.mask_head.bias.fill_(-3.0)  # every cell: "artifact"
    heat, _ = spot_image(model, Image.new('RGB', (100, 70), (90, 90, 90)), size)
    assert heat.shape == (70, 100)
    assert np.allclose(heat, 1 / (1 + np.exp(-3.0)), atol=1e-5)


def test_spot_bad_image_names_file(tmp_path, capsys):
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'this is not a jpeg')
    assert main(['spot', str(bad), '--img-size', '64']) == 2
    assert 'broken.jpg' in capsys.readouterr().err
    assert main(['spot', str(tmp_path / 'missing.png'), '--img-size', '64']) == 2
    assert 'missing.png' in capsys.readouterr().err
    assert main(['figure', 'gradcam', str(bad), '--img-size', '64', '--out', str(tmp_path / 'g.png')]) == 2
    assert 'broken.jpg' in capsys.readouterr().err


def test_cli_probe_errors_name_column_and_counts(tmp_path, capsys):
    import datasets

    rng = np.random.default_rng(0)
    rows = []
    for c in range(3):
        for _ in range(4):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, format='PNG')
            rows.append(({'bytes': buf.getvalue(), 'path': None}, c))
    ds = datasets.Dataset.from_dict({'image': [r[0] for r in rows], 'target': [r[1] for r in rows]},
                                    features=datasets.Features({'image': datasets.Image(),
                                                                'target': datasets.Value('int64')}))
    path = str(tmp_path / 'd.parquet')
    ds.to_parquet(path)
    assert main(['probe', '--data', path, '--no-cache']) == 2
    err = capsys.readouterr().err
    assert "label column 'label' not found" in err and 'target' in err
    assert main(['probe', '--data', path, '--label-column', 'target', '--num-classes', '10', '--no-cache']) == 2
    err = capsys.readouterr().err
    assert "'target'" in err and '3 classes' in err and '10 outputs' in err
    # and a working run on the same file
    out = str(tmp_path / 'r.json')
    assert main(['probe', '--data', path, '--label-column', 'target', '--val-per-class', '1', '--img-size', '32',
                 '--epochs', '2', '--no-cache', '--json', out]) == 0
    table = capsys.readouterr().out
    assert 'conv1' in table and 'conv5' in table and 'alexnet_spot (random init)' in table
    assert os.path.isfile(out)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(CIFAR), reason=f'real CIFAR-10 data not found at {CIFAR} (set TIMM_SPOT_DATA)')
def test_cli_transfer_linear_and_finetune_on_cifar(tmp_path, capsys):
    """Table 2 protocol on real images: folds from a column-free fold file, linear and one fine-tuning epoch."""
    folds = tmp_path / 'fold_indices.txt'
    folds.write_text('\n'.join(' '.join(str(i) for i in range(s, 50000, 2500)) for s in (0, 1, 2)) + '\n')
    common = ['--data', CIFAR, '--folds', str(folds), '--val-per-class', '5', '--img-size', '32', '--no-cache']
    assert main(['transfer', 'linear', *common, '--epochs', '2']) == 0
    out = capsys.readouterr().out
    assert 'over 3 fold(s)' in out and '+-' in out
    assert main(['transfer', 'finetune', *common, '--max-folds', '1', '--ft-epochs', '1', '--ft-batch-size', '10',
                 '--model-kwargs', 'head_type=linear']) == 0
    assert 'fine-tuned' in capsys.readouterr().out


def test_every_cli_option_has_help():
    import argparse

    from timm_spot.cli import build_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + [name])
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(' '.join(path + [action.option_strings[0] if action.option_strings else action.dest]))

    walk(build_parser(), ['timm-spot'])
    assert not missing, f'options without help: {missing}'

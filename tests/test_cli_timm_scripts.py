"""timm's own train.py / validate.py through the timm-spot wrapper (models registered before the script runs).

timm's scripts are in its GitHub repository, not in the wheel. The real-script test (a short fine-tune of
``alexnet_spot`` from the released backbone with timm's train.py, then validate.py on its checkpoint) runs when
``TIMM_TRAIN_SCRIPT`` points at train.py, or ``TIMM_SCRIPTS_DIR`` (default ``../timm-scripts`` beside the data
folder, i.e. ``<repo>/../shared/timm-scripts``) holds train.py and validate.py, and skips with the reason otherwise.
A stand-in script that uses the same timm calls train.py makes for model creation (``--pretrained
--pretrained-path``, ``--model-kwargs``), data (``create_dataset``, ``create_loader``) and one optimiser step always
runs.
"""
import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CIFAR10
from timm_spot.cli import main as cli_main
from timm_spot.eval.timm_scripts import find_script
from timm_spot.eval.timm_scripts import main as scripts_main
from timm_spot.models._releases import find_release

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR = str(CIFAR10)
DEFAULT_SCRIPTS_DIR = os.path.join(REPO, '..', 'shared', 'timm-scripts')


def _scripts():
    """(train.py, validate.py) of timm, or (None, reason)."""
    train = os.environ.get('TIMM_TRAIN_SCRIPT')
    folder = os.environ.get('TIMM_SCRIPTS_DIR') or DEFAULT_SCRIPTS_DIR
    if not train:
        train = os.path.join(folder, 'train.py')
    validate = os.environ.get('TIMM_VALIDATE_SCRIPT') or os.path.join(os.path.dirname(train), 'validate.py')
    if not os.path.isfile(train):
        return None, (f"timm's train.py not found at {os.path.abspath(train)}: set TIMM_TRAIN_SCRIPT or "
                      'TIMM_SCRIPTS_DIR (it is in the pytorch-image-models GitHub repository, not in the timm wheel)')
    if not os.path.isfile(validate):
        return None, f"timm's validate.py not found at {os.path.abspath(validate)}: set TIMM_VALIDATE_SCRIPT"
    return (os.path.abspath(train), os.path.abspath(validate)), None


SCRIPTS, NO_SCRIPTS = _scripts()


def _image_folder(root, per_class=4, classes=2):
    """train/ and validation/ class folders of real CIFAR-10 images (synthetic if the shared data is absent)."""
    images = []
    if os.path.isfile(CIFAR):
        import io

        import pyarrow.parquet as pq

        table = pq.read_table(CIFAR).slice(0, 4000)
        labels = table.column('label').to_pylist()
        cells = table.column('image').to_pylist()
        for c in range(classes):
            rows = [i for i, l in enumerate(labels) if l == c][:2 * per_class]
            images += [(c, Image.open(io.BytesIO(cells[i]['bytes'])).convert('RGB')) for i in rows]
    else:
        rng = np.random.default_rng(0)
        for c in range(classes):
            images += [(c, Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))) for _ in
                       range(2 * per_class)]
    count = {}
    for c, im in images:
        k = count.get(c, 0)
        count[c] = k + 1
        split = 'train' if k < per_class else 'validation'
        os.makedirs(os.path.join(root, split, f'class{c}'), exist_ok=True)
        im.save(os.path.join(root, split, f'class{c}', f'{k}.png'))
    return root


STAND_IN = textwrap.dedent('''
    """Stand-in for timm's train.py: same argument names and the same timm calls for model and data."""
    import argparse, json
    import torch
    from timm import utils
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.models import create_model

    parser = argparse.ArgumentParser()
    parser.add_argument('--data-dir')
    parser.add_argument('--dataset', default='')
    parser.add_argument('--model', default='resnet50')
    parser.add_argument('--pretrained', action='store_true')
    parser.add_argument('--pretrained-path', default=None)
    parser.add_argument('--initial-checkpoint', default='')
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--img-size', type=int, default=None)
    parser.add_argument('-b', '--batch-size', type=int, default=4)
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs)
    parser.add_argument('--output')

    def main():
        args = parser.parse_args()
        factory_kwargs = {}
        if args.pretrained_path:
            factory_kwargs['pretrained_cfg_overlay'] = dict(file=args.pretrained_path, num_classes=-1)
        model = create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes,
                             checkpoint_path=args.initial_checkpoint, **factory_kwargs, **args.model_kwargs)
        conv1 = float(model.state_dict()['features.conv1.weight'].double().sum())
        data_config = resolve_data_config(vars(args), model=model, verbose=False)
        ds = create_dataset(args.dataset, root=args.data_dir, split='train', is_training=True,
                            batch_size=args.batch_size)
        loader = create_loader(ds, input_size=data_config['input_size'], batch_size=args.batch_size,
                               is_training=True, use_prefetcher=False, mean=data_config['mean'],
                               std=data_config['std'], num_workers=0, device=torch.device('cpu'))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        x, y = next(iter(loader))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        with open(args.output, 'w') as f:
            json.dump(dict(model=type(model).__name__, num_classes=model.num_classes, loss=float(loss.detach()),
                           input_size=list(data_config['input_size']), batch=list(x.shape),
                           conv1=conv1), f)

    if __name__ == '__main__':
        main()
''')


@pytest.mark.slow
def test_wrapper_registers_models_and_passes_args(tmp_path, monkeypatch):
    """A stand-in train.py creates alexnet_spot with the weights file as pretrained source, trains one step."""
    import timm
    from safetensors.torch import save_file

    script = tmp_path / 'train.py'
    script.write_text(STAND_IN)
    torch.manual_seed(5)
    disc = timm.create_model('alexnet_spot_discriminator', head_kernel_size=2)  # discriminator weights transfer
    weights = str(tmp_path / 'disc.safetensors')
    save_file({k: v.contiguous() for k, v in disc.state_dict().items()}, weights)
    data = _image_folder(str(tmp_path / 'data'))
    out = tmp_path / 'result.json'
    args = ['--data-dir', data, '--model', 'alexnet_spot', '--num-classes', '2', '--img-size', '32',
            '--pretrained', '--pretrained-path', weights, '--model-kwargs', 'head_type=fc', 'fc_kernel_size=2',
            '--output', str(out)]
    argv_before = list(sys.argv)
    assert scripts_main(['train', str(script), '--', *args]) == 0
    assert sys.argv == argv_before
    res = json.loads(out.read_text())
    assert res['model'] == 'AlexNetSpot' and res['num_classes'] == 2 and res['batch'] == [4, 3, 32, 32]
    assert np.isfinite(res['loss'])
    # the conv weights came from the discriminator file (its BN folded into conv5 by alexnet_spot's filter)
    assert abs(res['conv1'] - float(disc.state_dict()['features.conv1.weight'].double().sum())) < 1e-6
    # the same through `timm-spot timm-train --script`, and via the environment variable
    out.unlink()
    assert cli_main(['timm-train', '--script', str(script), '--', *args]) == 0
    assert out.is_file()
    out.unlink()
    monkeypatch.setenv('TIMM_TRAIN_SCRIPT', str(script))  # restored afterwards, whatever it was
    assert cli_main(['timm-train', '--', *args]) == 0
    assert out.is_file()


def test_missing_script_is_a_clear_error(tmp_path, capsys, monkeypatch):
    for var in ('TIMM_TRAIN_SCRIPT', 'TIMM_VALIDATE_SCRIPT', 'TIMM_INFERENCE_SCRIPT', 'TIMM_SCRIPTS_DIR'):
        monkeypatch.delenv(var, raising=False)
    assert cli_main(['timm-validate', '--', '--model', 'alexnet_spot']) == 2
    assert 'TIMM_VALIDATE_SCRIPT' in capsys.readouterr().err
    assert cli_main(['timm-train', '--script', str(tmp_path / 'nope.py')]) == 2
    assert 'nope.py' in capsys.readouterr().err
    monkeypatch.setenv('TIMM_SCRIPTS_DIR', str(tmp_path))
    (tmp_path / 'inference.py').write_text('')
    assert find_script('inference') == str(tmp_path / 'inference.py')


@pytest.mark.slow
@pytest.mark.skipif(SCRIPTS is None, reason=str(NO_SCRIPTS))
def test_real_timm_train_then_validate_from_released_backbone(tmp_path):
    """timm's own train.py fine-tunes alexnet_spot from the released backbone (one short epoch, CPU) on a small
    CIFAR-10 image folder, then timm's validate.py evaluates the checkpoint it wrote."""
    train_py, validate_py = SCRIPTS
    rel = find_release('alexnet_spot', None)
    assert rel is not None, 'alexnet_spot has no release'
    weights = os.path.join(REPO, 'hub', rel.name, 'model.safetensors')
    data = _image_folder(str(tmp_path / 'data'), per_class=12, classes=2)
    out = tmp_path / 'out'
    code = scripts_main([
        'train', train_py, '--', '--data-dir', data, '--model', 'alexnet_spot', '--num-classes', '2',
        '--pretrained', '--pretrained-path', weights, '--img-size', str(rel.img_size), '--epochs', '1', '-b', '8',
        '--device', 'cpu', '--workers', '0', '--sched', 'cosine', '--warmup-epochs', '0', '--opt', 'adam',
        '--lr', '1e-4', '--output', str(out), '--experiment', 'ft', '--log-interval', '1', '--checkpoint-hist', '1'])
    assert code == 0
    summary = (out / 'ft' / 'summary.csv').read_text().splitlines()
    assert len(summary) == 2 and 'eval_top1' in summary[0]
    checkpoint = out / 'ft' / 'model_best.pth.tar'
    assert checkpoint.is_file()
    # fine-tuned from the release: conv1 moved only a little from the released weights (lr 1e-4, a few steps)
    from safetensors.torch import load_file
    released = load_file(weights)['features.conv1.weight']
    tuned = torch.load(checkpoint, map_location='cpu', weights_only=False)['state_dict']['features.conv1.weight']
    assert (tuned - released).abs().max() < 0.1 * released.abs().max()

    results = tmp_path / 'validate.json'
    code = scripts_main([
        'validate', validate_py, '--', '--data-dir', data, '--split', 'validation', '--model', 'alexnet_spot',
        '--num-classes', '2', '--img-size', str(rel.img_size), '--checkpoint', str(checkpoint), '--device', 'cpu',
        '--workers', '0', '-b', '8', '--results-file', str(results), '--results-format', 'json'])
    assert code == 0
    res = json.loads(results.read_text())
    res = res[0] if isinstance(res, list) else res
    assert res['model'] == 'alexnet_spot' and 0.0 <= float(res['top1']) <= 100.0


def test_image_folder_writer_makes_timm_train_and_validation_folders(tmp_path):
    import datasets

    from timm_spot.data.imagefolder import main as folder_main

    rng = np.random.default_rng(0)
    rows = []
    for c in range(3):
        for _ in range(5):
            buf = __import__('io').BytesIO()
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format='PNG')
            rows.append(({'bytes': buf.getvalue(), 'path': None}, c))
    ds = datasets.Dataset.from_dict(
        {'image': [r[0] for r in rows], 'label': [r[1] for r in rows]},
        features=datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=['a', 'b', 'c'])}))
    src = str(tmp_path / 'd.parquet')
    ds.to_parquet(src)
    out = tmp_path / 'folder'
    assert folder_main([src, str(out), '--classes', '2', '--train-per-class', '3', '--val-per-class', '2']) == 0
    assert sorted(p.name for p in (out / 'train').iterdir()) == ['a', 'b']
    assert sorted(p.name for p in (out / 'train' / 'a').iterdir()) == ['0.png', '1.png', '2.png']
    assert sorted(p.name for p in (out / 'validation' / 'b').iterdir()) == ['8.png', '9.png']  # the last rows

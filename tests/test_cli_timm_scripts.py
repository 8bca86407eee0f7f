"""timm's own train.py / validate.py through the timm-spot wrapper (models registered before the script runs).

timm's scripts are in its GitHub repository, not in the wheel. The real-script test runs when TIMM_TRAIN_SCRIPT (or
TIMM_SCRIPTS_DIR) points at pytorch-image-models' train.py and skips otherwise. A stand-in script that uses the same
timm calls train.py makes for model creation (``--pretrained --pretrained-path``, ``--model-kwargs``), data
(``create_dataset``, ``create_loader``) and one optimiser step always runs.
"""
import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from timm_spot.cli import main as cli_main
from timm_spot.eval.timm_scripts import find_script
from timm_spot.eval.timm_scripts import main as scripts_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR = os.path.join(REPO, '..', 'shared', 'data', 'cifar10', 'train.parquet')


def _train_script():
    path = os.environ.get('TIMM_TRAIN_SCRIPT')
    if not path and os.environ.get('TIMM_SCRIPTS_DIR'):
        path = os.path.join(os.environ['TIMM_SCRIPTS_DIR'], 'train.py')
    return path if path and os.path.isfile(path) else None


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


def test_wrapper_registers_models_and_passes_args(tmp_path):
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
    os.environ['TIMM_TRAIN_SCRIPT'] = str(script)
    try:
        assert cli_main(['timm-train', '--', *args]) == 0
    finally:
        del os.environ['TIMM_TRAIN_SCRIPT']
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


@pytest.mark.skipif(_train_script() is None,
                    reason="timm's train.py not found: set TIMM_TRAIN_SCRIPT=/path/to/pytorch-image-models/train.py "
                           '(it is in the GitHub repository, not in the timm wheel)')
def test_real_timm_train_one_epoch(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = str(tmp_path / 'alexnet_spot.safetensors')
    save_file(timm.create_model('alexnet_spot', num_classes=0).state_dict(), weights)
    data = _image_folder(str(tmp_path / 'data'))
    code = scripts_main([
        'train', _train_script(), '--', '--data-dir', data, '--model', 'alexnet_spot', '--num-classes', '2',
        '--pretrained', '--pretrained-path', weights, '--img-size', '32', '--epochs', '1', '-b', '4',
        '--device', 'cpu', '--workers', '0', '--sched', 'cosine', '--warmup-epochs', '0', '--opt', 'adam',
        '--lr', '1e-3', '--output', str(tmp_path / 'out'), '--experiment', 'spot', '--log-interval', '1'])
    assert code == 0
    assert os.path.isfile(os.path.join(tmp_path, 'out', 'spot', 'summary.csv'))

"""Linear probes: pooled sizes per layer, separable features reach ~100 %, shuffled labels stay near chance."""
import numpy as np
import pytest
import timm
import torch

import timm_spot  # noqa: F401
from timm_spot.eval.features import FeatureSet, TapExtractor, pooled_grid, tap_table
from timm_spot.eval.probe import (ProbeConfig, format_table, select_weight_decay, train_linear_probes,
                                  train_probes_per_layer_wd)


def _fs(features, labels, names=None):
    names = names or [f'l{i}' for i in range(len(features))]
    n = len(labels)
    return FeatureSet(names, [torch.as_tensor(f, dtype=torch.float32) for f in features],
                      torch.as_tensor(labels, dtype=torch.long), torch.arange(n), [(1, 1)] * len(features))


def test_pooled_grid_rule():
    # 224-px AlexNet sizes of Zhang et al.: conv1 96x10x10, conv2 256x6x6, conv3/4 384x5x5, conv5 256x6x6
    assert pooled_grid(96, 55, 55) == (10, 10)
    assert pooled_grid(256, 27, 27) == (6, 6)
    assert pooled_grid(384, 13, 13) == (5, 5)
    # maps smaller than the grid keep their own size
    assert pooled_grid(384, 4, 4) == (4, 4)
    assert pooled_grid(96, 8, 3) == (8, 3)
    assert pooled_grid(9200, 7, 7) == (1, 1)


# (map side, grid side) per tap conv1..conv5 for alexnet_spot, as documented in timm_spot/eval/features.py
EXPECTED = {
    32: [(8, 8), (4, 4), (2, 2), (2, 2), (2, 2)],
    64: [(16, 10), (8, 6), (4, 4), (4, 4), (4, 4)],
    96: [(24, 10), (12, 6), (6, 5), (6, 5), (6, 6)],
    224: [(56, 10), (28, 6), (14, 5), (14, 5), (14, 6)],
}


@pytest.mark.parametrize('img_size', sorted(EXPECTED))
def test_alexnet_spot_pooled_sizes(img_size):
    model = timm.create_model('alexnet_spot', num_classes=0).eval()
    table = tap_table(TapExtractor(model), img_size)
    assert [r['name'] for r in table] == ['conv1', 'conv2', 'conv3', 'conv4', 'conv5']
    assert [r['channels'] for r in table] == [96, 256, 384, 384, 256]
    for row, (side, grid) in zip(table, EXPECTED[img_size]):
        assert row['map'] == (side, side)
        assert row['grid'] == (grid, grid)
        assert row['dim'] == row['channels'] * grid * grid
    if img_size >= 96:  # the ~9,200-dim regime of the paper's protocol
        assert [r['dim'] for r in table] == [9600, 9216, 9600, 9600, 9216]


def test_tap_extractor_generic_methods_agree():
    """forward_intermediates, forward hooks on feature_info modules and a features_only model give the same maps."""
    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a = TapExtractor(model, method='intermediates')(x)
        b = TapExtractor(model, method='hooks')(x)
        fo = timm.create_model('resnet18', features_only=True).eval()
        fo.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith('fc.')}, strict=False)
        c = TapExtractor(fo)(x)
    assert len(a) == len(b) == len(c) == 5
    for u, v, w in zip(a, b, c):
        assert u.shape == v.shape == w.shape
        assert torch.allclose(u, v, atol=1e-5) and torch.allclose(u, w, atol=1e-5)


def test_separable_features_reach_100():
    rng = np.random.default_rng(0)
    k, d, n = 5, 64, 400
    centers = rng.normal(size=(k, d)) * 4.0
    y = rng.integers(0, k, size=n)
    x = centers[y] + rng.normal(size=(n, d))
    yv = rng.integers(0, k, size=200)
    xv = centers[yv] + rng.normal(size=(200, d))
    res = train_linear_probes(_fs([x], y), _fs([xv], yv), k, ProbeConfig(epochs=10, batch_size=64, seed=0))
    assert res['l0']['top1'] >= 99.0
    assert res['l0']['train_top1'] >= 99.0


def test_shuffled_labels_stay_near_chance_and_layers_train_together():
    """Two layers in one pass: an informative one (~100 %) and one with labels unrelated to it (~chance)."""
    rng = np.random.default_rng(1)
    k, d = 4, 32
    y = rng.integers(0, k, size=800)
    yv = rng.integers(0, k, size=800)
    centers = rng.normal(size=(k, d)) * 4.0
    good, good_v = centers[y] + rng.normal(size=(800, d)), centers[yv] + rng.normal(size=(800, d))
    noise, noise_v = rng.normal(size=(800, d)), rng.normal(size=(800, d))  # no relation to the labels
    res = train_linear_probes(_fs([good, noise], y, ['good', 'noise']), _fs([good_v, noise_v], yv, ['good', 'noise']),
                              k, ProbeConfig(epochs=10, batch_size=128))
    assert res['good']['top1'] >= 99.0
    assert abs(res['noise']['top1'] - 100.0 / k) < 8.0  # chance is 25 %
    # shuffled labels (train and validation): the features carry no information about them -> chance
    res = train_linear_probes(_fs([good], rng.permutation(y)), _fs([good_v], rng.permutation(yv)), k,
                              ProbeConfig(epochs=10, batch_size=128))
    assert abs(res['l0']['top1'] - 100.0 / k) < 8.0
    assert res['l0']['train_top1'] < 60.0  # nothing to learn either


def test_probe_rejects_labels_beyond_num_classes():
    with pytest.raises(ValueError, match='num_classes is 3'):
        train_linear_probes(_fs([np.zeros((4, 2))], [0, 1, 2, 5]), None, 3)


def test_format_table_shape():
    rows = {'a': {'conv1': {'top1': 12.34}, 'conv2': {'top1': 50.0}}, 'b': {'conv1': {'top1': 1.0}}}
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[1:] == ['conv1', 'conv2']
    assert '12.3%' in lines[1] and '50.0%' in lines[1]
    assert lines[2].rstrip().endswith('-')


def test_weight_decay_is_chosen_per_layer_on_the_training_rows_only():
    rng = np.random.default_rng(0)
    k, n = 4, 400
    y = rng.integers(0, k, size=n)
    clean = np.eye(k)[y] * 3 + rng.normal(size=(n, k)) * 0.3  # separable: every decay reaches 100 %
    # 300 pure-noise dims beside a weak signal: unregularised probes overfit the 320 fitting rows
    noisy = np.concatenate([np.eye(k)[y] * 2.0 + rng.normal(size=(n, k)), rng.normal(size=(n, 300))], 1)
    train = _fs([clean, noisy], y, names=['clean', 'noisy'])
    cfg = ProbeConfig(epochs=30, batch_size=64, seed=0)
    sweep = select_weight_decay(train, k, [0.0, 30.0], cfg)
    assert sweep['noisy']['sweep'][30.0] > sweep['noisy']['sweep'][0.0] + 5  # decay helps the noisy layer...
    assert sweep['noisy']['weight_decay'] == 30.0  # ...and is chosen for it
    assert sweep['clean']['sweep'] == {0.0: 100.0, 30.0: 100.0}
    assert sweep['clean']['weight_decay'] == 30.0  # ties go to the larger decay
    # training with each layer's own decay equals training that layer alone with it
    val = _fs([clean[:100], noisy[:100]], y[:100], names=['clean', 'noisy'])
    per_layer = train_probes_per_layer_wd(train, val, k, {'clean': 0.0, 'noisy': 30.0}, cfg)
    alone = train_linear_probes(_fs([noisy], y, names=['noisy']), _fs([noisy[:100]], y[:100], names=['noisy']), k,
                                ProbeConfig(epochs=30, batch_size=64, seed=0, weight_decay=30.0))
    assert per_layer['noisy']['top1'] == alone['noisy']['top1'] and per_layer['noisy']['weight_decay'] == 30.0
    assert per_layer['clean']['weight_decay'] == 0.0 and list(per_layer)[:2] == ['clean', 'noisy']
    with pytest.raises(ValueError, match='no candidate'):
        select_weight_decay(train, k, [], cfg)

"""Evaluation data: label checks name the column / the class counts; feature cache equals fresh extraction."""
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import timm_spot  # noqa: F401
from timm_spot.eval.labelled import ImageRows, load_labelled, subset_per_class
from timm_spot.eval.features import TapExtractor, create_backbone, eval_transform, extract_features
from timm_spot.eval.protocols import layerwise_probe, load_folds, prepare_features

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from conftest import DATA_ROOT  # noqa: E402  ($TIMM_SPOT_DATA, default <repo>/../shared/data)

SHARED = str(DATA_ROOT)
CIFAR = os.path.join(SHARED, 'cifar10', 'train.parquet')
needs_cifar = pytest.mark.skipif(not os.path.isfile(CIFAR), reason=f'real CIFAR-10 data not found at {CIFAR} (set TIMM_SPOT_DATA)')

COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40)]


def make_parquet(path, per_class=8, classes=3, size=32, label='int', seed=0, extra=None):
    """Tiny labelled image set: class c is a noisy image of colour COLORS[c]; Parquet in the datasets layout."""
    import datasets

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(classes):
        for _ in range(per_class):
            arr = np.clip(np.array(COLORS[c])[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255)
            buf = io.BytesIO()
            Image.fromarray(arr.astype(np.uint8)).save(buf, format='PNG')
            images.append({'bytes': buf.getvalue(), 'path': None})
            labels.append(c)
    cols = {'image': images}
    feats = {'image': datasets.Image()}
    if label == 'int':
        cols['label'], feats['label'] = labels, datasets.Value('int64')
    elif label == 'classlabel':
        cols['label'], feats['label'] = labels, datasets.ClassLabel(names=[f'c{i}' for i in range(classes)])
    elif label == 'str':
        cols['label'], feats['label'] = [f'class_{c}' for c in labels], datasets.Value('string')
    for k, v in (extra or {}).items():
        cols[k], feats[k] = v, datasets.Value('int64')
    datasets.Dataset.from_dict(cols, features=datasets.Features(feats)).to_parquet(path)
    return path


def test_missing_label_column_names_it(tmp_path):
    path = make_parquet(str(tmp_path / 'd.parquet'), label='none')
    with pytest.raises(ValueError, match="'label'"):
        load_labelled(path)
    with pytest.raises(ValueError, match="'category'"):
        load_labelled(make_parquet(str(tmp_path / 'e.parquet')), label_column='category')


def test_class_count_mismatch_names_counts(tmp_path):
    path = make_parquet(str(tmp_path / 'd.parquet'), classes=3, label='classlabel')
    data = load_labelled(path, num_classes=3)
    assert data.num_classes == 3 and data.class_names == ['c0', 'c1', 'c2']
    with pytest.raises(ValueError, match=r"'label'.*3 classes.*10 outputs"):
        load_labelled(path, num_classes=10)
    with pytest.raises(ValueError, match=r'3 classes.*10 outputs'):
        layerwise_probe(source=path, num_classes=10, val_per_class=2, log=None)


def test_string_labels_and_unlabelled_rows(tmp_path):
    data = load_labelled(make_parquet(str(tmp_path / 's.parquet'), classes=2, label='str'))
    assert data.class_names == ['class_0', 'class_1'] and data.num_classes == 2
    assert sorted(set(data.labels.tolist())) == [0, 1]
    import datasets

    ds = datasets.load_dataset('parquet', data_files=str(tmp_path / 's.parquet'), split='train')
    ds = ds.remove_columns('label').add_column('label', [-1] * len(ds))
    ds.to_parquet(str(tmp_path / 'u.parquet'))
    with pytest.raises(ValueError, match='unlabelled'):
        load_labelled(str(tmp_path / 'u.parquet'))


def test_subset_per_class_and_folds(tmp_path):
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    assert subset_per_class(labels, np.arange(8), 2).tolist() == [0, 1, 2, 3]
    path = make_parquet(str(tmp_path / 'f.parquet'), per_class=4, classes=2, extra={'fold': [0, 1, -1, 0] * 2})
    data = load_labelled(path)
    folds = load_folds('fold', data)
    assert [f.tolist() for f in folds] == [[0, 3, 4, 7], [1, 5]]
    txt = tmp_path / 'fold_indices.txt'
    txt.write_text('0 1 2\n3 4 5\n')
    assert [f.tolist() for f in load_folds(str(txt), data)] == [[0, 1, 2], [3, 4, 5]]
    txt.write_text('0 99\n')
    with pytest.raises(ValueError, match='outside'):
        load_folds(str(txt), data)
    with pytest.raises(ValueError, match='neither a file nor a column'):
        load_folds('nope', data)


def test_cached_features_equal_fresh(tmp_path):
    path = make_parquet(str(tmp_path / 'd.parquet'), per_class=4, classes=3)
    data = load_labelled(path)
    rows = np.array([0, 2, 5, 7, 9, 11])
    kw = dict(img_size=32, cache_dir=str(tmp_path / 'cache'), seed=3, batch_size=4, log=None)
    first = prepare_features('alexnet_spot', None, data, rows, **kw)
    assert first.meta['cached'] is False
    again = prepare_features('alexnet_spot', None, data, rows, **kw)
    assert again.meta['cached'] is True and again.meta['cache'] == first.meta['cache']
    # fresh extraction, no cache at all
    model = create_backbone('alexnet_spot', None, seed=3).eval()
    fresh = extract_features(TapExtractor(model), ImageRows(data.ds, rows, eval_transform(model, 32, crop_pct=1.0),
                                                            data.labels), 32, batch_size=4)
    assert again.names == fresh.names == ['conv1', 'conv2', 'conv3', 'conv4', 'conv5']
    assert [tuple(g) for g in again.grids] == [tuple(g) for g in fresh.grids]
    for a, b in zip(again.features, fresh.features):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(again.labels, fresh.labels) and again.rows.tolist() == rows.tolist()
    # anything the features depend on changes the key: other seed, other rows, other size
    other = prepare_features('alexnet_spot', None, data, rows, **{**kw, 'seed': 4})
    assert other.meta['cache'] != first.meta['cache']
    assert not torch.equal(other.features[0], first.features[0])
    assert prepare_features('alexnet_spot', None, data, rows[:3], **kw).meta['cache'] != first.meta['cache']
    assert len(os.listdir(tmp_path / 'cache')) == 3


def test_weights_file_changes_cache_key_and_loads(tmp_path):
    from safetensors.torch import save_file

    path = make_parquet(str(tmp_path / 'd.parquet'), per_class=2, classes=2)
    data = load_labelled(path)
    model = create_backbone('alexnet_spot', None, seed=11)
    save_file(model.state_dict(), str(tmp_path / 'w.safetensors'))
    kw = dict(img_size=32, cache_dir=str(tmp_path / 'cache'), log=None)
    from_file = prepare_features('alexnet_spot', str(tmp_path / 'w.safetensors'), data, [0, 1, 2, 3], **kw)
    same_seed = prepare_features('alexnet_spot', None, data, [0, 1, 2, 3], seed=11, **kw)
    assert from_file.meta['cache'] != same_seed.meta['cache']
    for a, b in zip(from_file.features, same_seed.features):  # the file holds exactly the seed-11 weights
        assert torch.allclose(a, b)
    save_file({'foo.weight': torch.zeros(3)}, str(tmp_path / 'bad.safetensors'))
    with pytest.raises(Exception, match='bad.safetensors'):
        create_backbone('alexnet_spot', str(tmp_path / 'bad.safetensors'))


def test_unreadable_images_are_skipped(tmp_path):
    import datasets

    path = make_parquet(str(tmp_path / 'd.parquet'), per_class=3, classes=2)
    ds = datasets.load_dataset('parquet', data_files=path, split='train').cast_column('image', datasets.Image(
        decode=False))
    images = list(ds['image'])
    images[1] = {'bytes': b'not an image', 'path': 'broken.png'}
    ds = ds.remove_columns('image').add_column('image', images).cast_column('image', datasets.Image())
    ds.to_parquet(str(tmp_path / 'broken.parquet'))
    data = load_labelled(str(tmp_path / 'broken.parquet'))
    fs = prepare_features('alexnet_spot', None, data, np.arange(6), img_size=32, batch_size=2, log=None)
    assert len(fs) == 5 and 1 not in fs.rows.tolist() and fs.meta['skipped'] == 1


@needs_cifar
def test_cifar_probe_smoke(tmp_path):
    """Real data end to end: 10 CIFAR-10 images per class to train, the last 10 of each class held out."""
    from timm_spot.eval.probe import ProbeConfig

    res = layerwise_probe(source=CIFAR, train_per_class=10, val_per_class=10, img_size=32, cache_dir=str(tmp_path),
                          probe=ProbeConfig(epochs=3), log=None)
    assert [k for k in res if not k.startswith('_')] == ['conv1', 'conv2', 'conv3', 'conv4', 'conv5']
    assert res['_meta']['n_train'] == 100 and res['_meta']['n_val'] == 100
    assert all(0.0 <= res[k]['top1'] <= 100.0 for k in res if not k.startswith('_'))

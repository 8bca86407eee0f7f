"""The released pretrained weights: the one table that says which ``<model>.<tag>`` has weights.

Every row becomes a timm pretrained tag ``<model>.<tag>`` whose ``hf_hub_id`` is ``timm-spot/<model>.<tag>``, and
its weights ship in the repository as that Hub repo's folder, ``hub/<model>.<tag>/`` (model.safetensors,
config.json, README.md, training_config.yaml). ``tests/test_releases.py`` fails when a row has no folder or a
folder no row, so a tag never claims weights that do not exist.

* The first row of a model is its default tag (``timm.create_model('alexnet_spot', pretrained=True)``): list
  the newest, best release first.
* A model without a row has no pretrained tag: ``timm.create_model(name)`` builds the paper's architecture with
  its 128-px cfg, and ``pretrained=True`` fails with a message listing the releases. The paper's ImageNet recipe
  is a training config (``train_scripts/configs/imagenet.yaml``), not a tag: nobody has trained it.
* ``published``: the folder has been uploaded to the Hub (``python -m hub publish``); ``revision``: the Hub
  commit to pin (``hf_hub_id='timm-spot/<model>.<tag>@<revision>'``). Unpublished weights load offline from the
  shipped folder: ``local-dir:hub/<model>.<tag>``, or a cache seeded by ``python -m hub cache --all``.

Adding a release (see also ``hub/__init__.py``): add its rows here (newest first), then
``python -m hub export RUN_DIR --tag TAG`` writes the folders, then ``python -m pytest tests/test_releases.py``.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

__all__ = ['HUB_OWNER', 'Release', 'RELEASES', 'releases', 'find_release', 'release_cfg', 'release_cfgs', 'repo_id',
           'folder_name']

HUB_OWNER = 'timm-spot'


@dataclass(frozen=True)
class Release:
    model: str  # registered architecture
    tag: str  # pretrained tag
    img_size: int  # training input size (the tag's input_size; the discriminator's fc6 spans img_size / 16)
    crop_pct: float = 1.0  # evaluation crop of the tag's cfg
    published: bool = False  # uploaded to the Hugging Face Hub
    revision: Optional[str] = None  # Hub commit to pin once published
    sha256: Optional[str] = None  # of model.safetensors: loading the tag from a Hub cache checks it (_spot_builder)

    @property
    def name(self) -> str:
        return f'{self.model}.{self.tag}'

    @property
    def repo_id(self) -> str:
        return f'{HUB_OWNER}/{self.name}'


# Newest first per model: the first row of a model is its default tag.
RELEASES: Tuple[Release, ...] = (
    # v2: all three models of one 64-px CIFAR-10 run (the discriminator's fc6 kernel is 4; MODEL_CARD.md)
    Release('alexnet_spot', 'spot_c10_64_v2', 64,
            sha256='00b5b2a609fc14b8acb622be7cbd262f416f7457366a0cff97be18a1a64657e6'),
    Release('alexnet_spot_discriminator', 'spot_c10_64_v2', 64,
            sha256='9cf1506e2a066561cf0a8dfc681b607f4c35a5f3e137981cda76758b9c043b60'),
    Release('damage_repair_generator', 'spot_c10_64_v2', 64,
            sha256='45a280bc5f20fa9179e03857fb315d6f522b5ab9e07029217640c9daa06eac7a'),
    # v1: the backbone of the first short CPU run (CIFAR-10 at 64 px, MODEL_CARD.md)
    Release('alexnet_spot', 'spot_c10_64', 64,
            sha256='a1073cb5b8edb1ea477200c737f9e8b83fd389a0029f05bd9dfb25fb46245d5c'),
)


def releases(model: Optional[str] = None) -> Tuple[Release, ...]:
    """The released (model, tag) rows, optionally of one model, in table order (default tag first)."""
    return tuple(r for r in RELEASES if model is None or r.model == model)


def find_release(model: str, tag: Optional[str]) -> Optional[Release]:
    """The row of ``model.tag`` (``tag`` None or '': the model's default release), or None."""
    rows = releases(model)
    if not tag:
        return rows[0] if rows else None
    return next((r for r in rows if r.tag == tag), None)


def repo_id(model: str, tag: str) -> str:
    return f'{HUB_OWNER}/{model}.{tag}'


def folder_name(model: str, tag: str) -> str:
    """The shipped folder of a release under hub/ (named like its Hub repo)."""
    return f'{model}.{tag}'


_CFG_BUILDERS: Dict[str, Tuple[Callable[..., Dict[str, Any]], Callable[[int], Dict[str, Any]]]] = {}


def _row_cfg(r: Release) -> Dict[str, Any]:
    cfg, size_fields = _CFG_BUILDERS[r.model]
    hub_id = r.repo_id + (f'@{r.revision}' if r.revision else '')
    return cfg(hf_hub_id=hub_id, input_size=(3, r.img_size, r.img_size), crop_pct=r.crop_pct,
               **size_fields(r.img_size))


def release_cfg(model: str, tag: str, img_size: int) -> Dict[str, Any]:
    """The pretrained cfg a row ``Release(model, tag, img_size)`` gives (also for a row not in the table yet:
    ``python -m hub export`` uses it to export a new release before its row is added)."""
    row = find_release(model, tag) or Release(model, tag, img_size)
    return {**_row_cfg(row), 'tag': tag, 'architecture': model}


def release_cfgs(model: str, cfg: Callable[..., Dict[str, Any]],
                 size_fields: Callable[[int], Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """``generate_default_cfgs`` input for ``model``: one cfg per release row, or the paper's untagged cfg.

    Args:
        model: architecture name.
        cfg: the model file's ``_cfg(**overrides)`` (the paper's 128-px cfg without overrides).
        size_fields: cfg fields that depend on the input size (e.g. ``pool_size``), given the image size.
    """
    _CFG_BUILDERS[model] = (cfg, size_fields)
    rows = releases(model)
    if not rows:
        return {model: cfg()}
    return {r.name: _row_cfg(r) for r in rows}

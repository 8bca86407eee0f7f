"""Upload an exported model folder to the Hugging Face Hub and print the revision to pin.

``publish_folder`` checks the folder first (config.json names a registered architecture, model.safetensors has a
valid header with ``format=pt`` metadata of the same architecture, README.md has parseable front matter), then
``HfApi.create_repo(exist_ok=True)`` + ``HfApi.create_commit`` with one explicit ``CommitOperationAdd`` per listed
file (never ``allow_patterns``: a file named ``*`` or ``[.]env`` would be a glob pattern matching ``.env``); a
symlink, or anything that resolves outside the folder, is refused. The token comes from ``HF_TOKEN`` (or a saved
``hf auth login``). ``dry_run=True`` lists what would be uploaded (path, size, sha256, LFS) and makes no network
call at all.

Pinning (timm 1.0.31): ``timm.models._hub.hf_split`` splits a Hub id at ``@``, and every Hub load goes through it
(``load_state_dict_from_hf``, ``download_from_hf`` for config.json, ``load_custom_from_hf``), passing the part after
``@`` as ``revision=`` to ``hf_hub_download``. So a revision is pinned by writing it into the id:

* in the release table (timm_spot/models/_releases.py): ``Release(..., published=True, revision='<commit sha>')``
  (``_resolve_pretrained_source`` returns the id unchanged; there is no separate ``revision`` cfg field);
* by name: ``timm.create_model('hf-hub:timm-spot/alexnet_spot.spot_c10_64@<commit sha>', pretrained=True)``
  (config.json and weights both come from that commit: the id with ``@`` becomes the cfg's ``hf_hub_id``);
* at run time without editing code: ``pretrained_cfg_overlay=dict(hf_hub_id='...@<sha>')``.

A full 40-hex commit sha is immutable, and ``hf_hub_download`` returns an already cached pinned file without any
HEAD request, so pinned loads are also the ones that work offline without ``HF_HUB_OFFLINE``. Branch or tag names
(``@v1``) work too but can move.
"""
import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ._files import PathLike, describe_files, human_size, list_repo_files, read_safetensors_header
from .card import split_front_matter
from .export import looks_like_imagenet_1k

__all__ = ['check_folder', 'publish_folder', 'pin_instructions', 'MODEL_FILES']

# where each architecture's default cfg lives
MODEL_FILES = {
    'alexnet_spot': 'timm_spot/models/alexnet_spot.py',
    'alexnet_spot_discriminator': 'timm_spot/models/alexnet_spot_discriminator.py',
    'damage_repair_generator': 'timm_spot/models/damage_repair_generator.py',
}


def check_folder(folder: PathLike) -> Dict[str, Any]:
    """Validate an exported folder; returns what publish needs. Raises ValueError listing every problem."""
    import timm
    import timm_spot  # noqa: F401  (registers the models)
    from .provenance import registry_report

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'not a folder: {folder}')
    problems: List[str] = []
    config: Dict[str, Any] = {}
    meta: Dict[str, str] = {}
    card: Dict[str, Any] = {}
    shapes: Dict[str, Any] = {}
    for required in ('config.json', 'model.safetensors', 'README.md'):
        if not (folder / required).is_file():
            problems.append(f'{required} missing')
    if (folder / 'config.json').is_file():
        try:
            config = json.loads((folder / 'config.json').read_text(encoding='utf-8'))
        except json.JSONDecodeError as e:
            problems.append(f'config.json is not valid JSON: {e}')
    arch = config.get('architecture')
    if config and not arch:
        problems.append('config.json has no architecture')
    elif arch and not timm.is_model(arch):
        problems.append(f'config.json architecture {arch!r} is not a registered timm model')
    if (folder / 'model.safetensors').is_file():
        try:
            header = read_safetensors_header(folder / 'model.safetensors')
            meta = header.pop('__metadata__', {}) or {}
            shapes = {k: v['shape'] for k, v in header.items()}
            if meta.get('format') != 'pt':
                problems.append(f"model.safetensors metadata format is {meta.get('format')!r}, not 'pt'")
            if arch and meta.get('architecture') not in (None, arch):
                problems.append(f"model.safetensors is for {meta.get('architecture')!r}, config.json for {arch!r}")
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f'model.safetensors: {e}')
    if (folder / 'README.md').is_file():
        try:
            card, _ = split_front_matter((folder / 'README.md').read_text(encoding='utf-8'))
            if card.get('library_name') != 'timm':
                problems.append(f"README.md front matter library_name is {card.get('library_name')!r}, not 'timm'")
        except Exception as e:  # yaml errors and missing front matter alike
            problems.append(f'README.md: {e}')
    problems.extend(_escaping_entries(folder))
    if problems:
        raise ValueError(f'{folder} is not ready to publish:\n  - ' + '\n  - '.join(problems))
    registry = registry_report(arch, config.get('model_args', {}), shapes, tag=meta.get('pretrained_tag'))
    return dict(folder=folder, architecture=arch, config=config, metadata=meta, card=card, registry=registry,
                files=describe_files(folder))


def _escaping_entries(folder: Path) -> List[str]:
    """Symlinks, and entries resolving outside ``folder``, among the files an upload would list: an upload must
    never carry a file from elsewhere on the machine (a link to ~/.ssh, to a token file)."""
    root = folder.resolve()
    out = []
    for rel, path in list_repo_files(folder):
        if path.is_symlink():
            out.append(f'{rel} is a symlink (to {os.readlink(path)}): only regular files are uploaded; replace it '
                       f'by the file itself or remove it')
        elif root not in path.resolve().parents:
            out.append(f'{rel} resolves outside the folder ({path.resolve()}); remove it')
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ''


def _is_network_error(e: BaseException) -> bool:
    """A connection failure (no network, DNS, offline mode), as opposed to an HTTP answer of the Hub."""
    names = ('ConnectionError', 'ConnectError', 'ConnectTimeout', 'Timeout', 'OfflineModeIsEnabled', 'NameResolution',
             'gaierror', 'MaxRetryError', 'NewConnectionError', 'ProxyError', 'LocalEntryNotFoundError')
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (ConnectionError, TimeoutError)) or any(n in type(e).__name__ for n in names):
            return True
        e = e.__cause__ or e.__context__
    return False


def pin_instructions(architecture: str, repo_id: str, commit: str, folder: Optional[PathLike] = None,
                     tag: Optional[str] = None) -> List[str]:
    """Lines telling how to pin ``repo_id`` at ``commit`` in timm-spot's default cfgs and by name."""
    tag = tag or repo_id.split('/')[-1].split('.', 1)[-1]
    lines = [
        f'revision to pin: {commit}',
        '  release table (timm_spot/models/_releases.py), the row of this release:',
        f"    Release('{architecture}', '{tag}', <img_size>, published=True, revision='{commit}'),",
        f"  by name:  timm.create_model('hf-hub:{repo_id}@{commit}', pretrained=True)",
        f"  ad hoc:   timm.create_model('{architecture}', pretrained=True, "
        f"pretrained_cfg_overlay=dict(hf_hub_id='{repo_id}@{commit}'))",
    ]
    if folder is not None:
        lines.append(f'  offline:  python -m hub cache {folder} --repo-id {repo_id} --commit {commit} '
                     f'--cache-dir "$HF_HUB_CACHE"')
    return lines


def publish_folder(
        folder: PathLike,
        repo_id: str,
        revision: str = 'main',
        dry_run: bool = False,
        token: Optional[str] = None,
        private: bool = False,
        commit_message: Optional[str] = None,
        create_pr: bool = False,
        force: bool = False,
        api: Any = None,
        log: Optional[Callable[[str], None]] = print,
) -> Dict[str, Any]:
    """Upload ``folder`` to ``repo_id`` (see the module docstring). Returns a summary dict (``commit`` if uploaded).

    Args:
        folder: an exported model folder (``python -m hub export``).
        repo_id: ``owner/name`` on the Hub (no ``@revision``: use ``revision``).
        revision: branch to commit to (created from main if missing).
        dry_run: list files and checks only; no network, no token needed.
        token: Hub token; default ``HF_TOKEN`` / the saved login.
        private: create the repo private (only when it does not exist yet).
        commit_message: default ``Upload <architecture> (<training run>)``.
        create_pr: open a pull request instead of committing to ``revision``.
        force: publish even where the checks advise against it (non-default constructor args or unknown training
            data under the repo id a registered default cfg points to).
        api: an ``HfApi``-like object (tests); default ``HfApi(token=...)``.
    """
    log = log or (lambda s: None)
    if '@' in repo_id:
        raise ValueError(f'repo_id {repo_id!r} contains @: pass the branch with --revision')
    if repo_id.count('/') != 1:
        raise ValueError(f"repo_id must be 'owner/name', got {repo_id!r}")
    info = check_folder(folder)
    folder = Path(folder)
    arch = info['architecture']
    meta = info['metadata']
    advice, notes = _publish_advice(arch, meta, info['registry'], repo_id)

    total = sum(f['size'] for f in info['files'])
    log(f"{'DRY RUN: would upload' if dry_run else 'uploading'} {folder} -> https://huggingface.co/{repo_id} "
        f"(revision {revision}{', as a pull request' if create_pr else ''}): {len(info['files'])} files, "
        f"{human_size(total)}")
    for f in info['files']:
        log(f"  {f['path']:<22} {f['size']:>12,d} B  sha256 {f['sha256']}{'  (LFS)' if f['lfs'] else ''}")
    for a in advice + notes:
        log(f'WARNING: {a}')
    summary = dict(repo_id=repo_id, revision=revision, architecture=arch, files=info['files'], dry_run=dry_run,
                   advice=advice, notes=notes, commit=None)
    if advice and not force and not dry_run:
        raise RuntimeError('not publishing: ' + '; '.join(advice) + ' (pass --force to publish anyway)')
    if dry_run:
        log('DRY RUN: no network access made. After a real upload, pin with:')
        for line in pin_instructions(arch, repo_id, '<commit sha>', folder, meta.get('pretrained_tag')):
            log(line)
        return summary

    api = api if api is not None else _hub_api(token)
    repo_id, commit = _upload(api, folder, info['files'], repo_id, revision, private, create_pr,
                              commit_message or f"Upload {arch} ({meta.get('training_run', 'timm-spot export')})")
    sha = commit.oid
    summary.update(commit=sha, commit_url=getattr(commit, 'commit_url', None), pr_url=getattr(commit, 'pr_url', None))
    log(f"committed {getattr(commit, 'commit_url', sha)}")
    if create_pr:
        log(f"pull request {getattr(commit, 'pr_url', '')}: pin the commit on {revision} after merging, not this one")
    for line in pin_instructions(arch, repo_id, sha, folder, meta.get('pretrained_tag')):
        log(line)
    return summary


def _publish_advice(arch: str, meta: Dict[str, str], registry: Dict[str, Any], repo_id: str):
    """(advice, notes): reasons not to publish under ``repo_id`` (blocking unless forced: the repo a registered
    default cfg points to, with other constructor args or non-ImageNet data under an in1k tag), and conventions
    (never blocking: the repo name starts with the architecture)."""
    import timm.models
    advice: List[str] = []
    notes: List[str] = []
    try:  # a tag not in timm_spot's release table (yet) has no registered cfg
        default_cfg = timm.models.get_pretrained_cfg(f"{arch}.{meta.get('pretrained_tag', '')}") \
            if meta.get('pretrained_tag') else None
    except RuntimeError:
        default_cfg = None
    canonical = default_cfg.hf_hub_id.split('@')[0] if default_cfg is not None and default_cfg.hf_hub_id else None
    if repo_id == canonical:
        if not registry['equivalent']:
            advice.append(
                f"{repo_id} is what timm.create_model('{arch}', pretrained=True) loads, but these weights were "
                f"trained with other constructor args ({registry['shape_mismatches'][:2] or registry['nondefault_args']})")
        if default_cfg.tag and default_cfg.tag.endswith('in1k') and \
                not looks_like_imagenet_1k(meta.get('training_data')):
            advice.append(f"{repo_id} promises ImageNet-1k weights but the training data is "
                          f"{meta.get('training_data', 'unknown')!r}")
    elif not repo_id.split('/')[-1].startswith(arch):
        notes.append(f'repo name {repo_id.split("/")[-1]!r} does not start with the architecture {arch!r} '
                     f'(timm convention: <architecture>.<tag>)')
    return advice, notes


def _hub_api(token: Optional[str]) -> Any:
    """An ``HfApi`` with a write token (``token``, else ``HF_TOKEN``, else the saved login)."""
    from huggingface_hub import HfApi, get_token
    import timm_spot
    token = token or os.environ.get('HF_TOKEN') or get_token()
    if not token:
        raise RuntimeError('no Hugging Face token: set HF_TOKEN (a write token) or run `hf auth login`')
    return HfApi(token=token, library_name='timm-spot', library_version=timm_spot.__version__)


def _upload(api: Any, folder: Path, files: List[Dict[str, Any]], repo_id: str, revision: str, private: bool,
            create_pr: bool, commit_message: str):
    """(repo id as the Hub names it, commit info): create the repo (and branch) if missing and commit ``files``.

    Exactly the files the dry run lists, each added by name: no pattern matching (a file named '*' or '[.]env' is a
    glob in allow_patterns and would upload .env), hidden files such as .env never leave."""
    from huggingface_hub import CommitOperationAdd
    operations = [CommitOperationAdd(path_in_repo=f['path'], path_or_fileobj=str(folder / f['path']))
                  for f in files]
    try:
        repo_url = api.create_repo(repo_id, exist_ok=True, private=private)
        repo_id = getattr(repo_url, 'repo_id', None) or repo_id
        if revision != 'main' and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(repo_id=repo_id, operations=operations, revision=revision, create_pr=create_pr,
                                   commit_message=commit_message)
    except Exception as e:  # noqa: BLE001
        if _is_network_error(e):
            raise RuntimeError(f'cannot reach the Hugging Face Hub to publish {repo_id} ({type(e).__name__}: '
                               f'{_first_line(e)}); nothing was uploaded: check the network connection (and '
                               f'HF_ENDPOINT / HF_HUB_OFFLINE), or list the upload with --dry-run') from None
        raise
    return repo_id, commit

"""``python -m hub {export,publish,cache,verify-cache}``: see ``hub/__init__.py`` and each command's --help."""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

HUB_DIR = Path(__file__).resolve().parent  # the shipped release folders hub/<model>.<tag>/


def _models(value: str) -> List[str]:
    return [v.strip() for v in value.split(',') if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m hub', description=__doc__)
    sub = p.add_subparsers(dest='command', required=True)

    e = sub.add_parser('export', help='export a pretraining run as Hub model folders <out>/<model_name>.<tag>/')
    e.add_argument('run_dir', type=Path, help='run directory of train_scripts/pretrain.py')
    e.add_argument('--out', type=Path, default=HUB_DIR, help='parent folder of the model folders (default: hub/)')
    e.add_argument('--models', type=_models, default=None,
                   help='comma-separated model names (default: every <name>.safetensors in the run)')
    e.add_argument('--results', type=Path, default=None,
                   help='JSON of measured probe accuracies for the model-index (see hub/card.py for the layouts)')
    e.add_argument('--img-size', type=int, default=None,
                   help='input size recorded in config.json (default: found in config.yaml, else the registry cfg)')
    e.add_argument('--dataset', action='append', default=None,
                   help='Hub dataset id for the card front matter (repeatable; default from config.yaml)')
    e.add_argument('--force', action='store_true',
                   help='replace output folders holding foreign files, or a shipped release folder')
    e.add_argument('--tag', default=None,
                   help='release tag, e.g. spot_c10_64_v2: writes <out>/<model>.<tag>/ for repo timm-spot/<model>.<tag> '
                        '(default: a new tag <run dir name>_<YYYYMMDD>, so a shipped release is never replaced; a '
                        'tag of timm_spot/models/_releases.py whose folder exists needs --force)')
    e.add_argument('--pretext-dtype', choices=('auto', 'bfloat16', 'float32'), default='auto',
                   help='storage of the discriminator and generator: auto (default) = bfloat16 where the outputs '
                        'stay within hub.export.BF16_TOLERANCE of float32, else float32; the backbone is always '
                        'float32')
    e.add_argument('--no-verify', dest='verify', action='store_false',
                   help='skip loading each folder back through timm (local-dir:) after writing')

    u = sub.add_parser('publish', help='upload an exported folder (HF_TOKEN) and print the revision to pin')
    u.add_argument('folder', type=Path, help='an exported folder, e.g. hub/alexnet_spot.spot_c10_64')
    u.add_argument('--repo-id', required=True, help='owner/name, e.g. timm-spot/alexnet_spot.spot_in1k')
    u.add_argument('--revision', default='main', help='branch to commit to (created if missing)')
    u.add_argument('--dry-run', action='store_true', help='list files, sizes and sha256; no network')
    u.add_argument('--private', action='store_true', help='create the repo private')
    u.add_argument('--create-pr', action='store_true', help='open a pull request instead of committing')
    u.add_argument('--commit-message', default=None, help='default: Upload <architecture> (<training run>)')
    u.add_argument('--force', action='store_true', help='publish despite warnings (see publish --help text)')
    u.add_argument('--json', dest='json_out', type=Path, default=None, help='also write the summary as JSON')

    c = sub.add_parser('cache', help='put exported folders into a Hugging Face cache for offline loading')
    c.add_argument('folder', type=Path, nargs='?', default=None,
                   help='an exported folder, e.g. hub/alexnet_spot.spot_c10_64 (or --all)')
    c.add_argument('--all', dest='all_folders', action='store_true',
                   help='every shipped release folder hub/<model>.<tag>/, each as repo timm-spot/<model>.<tag>')
    c.add_argument('--repo-id', default=None,
                   help="repo id the folder stands for (default: timm-spot/<folder name>, e.g. "
                        "timm-spot/alexnet_spot.spot_c10_64)")
    c.add_argument('--cache-dir', type=Path, default=None, help='hub cache root (default: HF_HUB_CACHE)')
    c.add_argument('--commit', default=None,
                   help="40-hex commit sha of the published repo (default: the release table's pinned revision, "
                        'else a synthetic hash of the files)')
    c.add_argument('--ref', default='main', help="branch the snapshot is recorded under ('' for none)")
    c.add_argument('--copy', action='store_true', help='copy files into snapshots instead of symlinking')

    v = sub.add_parser('verify-cache', help='re-hash a cached repo snapshot (huggingface_hub does not)')
    v.add_argument('--repo-id', required=True, help='e.g. timm-spot/alexnet_spot.spot_c10_64')
    v.add_argument('--cache-dir', type=Path, default=None, help='hub cache root (default: HF_HUB_CACHE)')
    v.add_argument('--revision', default='main', help='branch, tag or commit to check (default main)')
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == 'export':
        from .export import export_run
        results = None
        if args.results is not None:
            results = json.loads(args.results.read_text(encoding='utf-8'))
        export_run(args.run_dir, args.out, models=args.models, results=results, img_size=args.img_size,
                   datasets=args.dataset, force=args.force, verify=args.verify, tag=args.tag,
                   pretext_dtype=args.pretext_dtype)
        return 0
    if args.command == 'publish':
        from .publish import publish_folder
        summary = publish_folder(args.folder, args.repo_id, revision=args.revision, dry_run=args.dry_run,
                                 private=args.private, commit_message=args.commit_message,
                                 create_pr=args.create_pr, force=args.force)
        if args.json_out is not None:
            args.json_out.write_text(json.dumps(summary, indent=2, default=str))
        return 0
    if args.command == 'cache':
        from huggingface_hub import constants
        from .cache import build_offline_cache, offline_env, repo_cache_folder, shipped_releases
        cache_dir = args.cache_dir or Path(constants.HF_HUB_CACHE)
        if args.all_folders == (args.folder is not None):
            raise ValueError('give either a folder or --all')
        if args.all_folders:
            if args.repo_id or args.commit:
                raise ValueError('--all takes each repo id and pinned revision from the release table')
            jobs = shipped_releases()
            if not jobs:
                raise FileNotFoundError(f'no release folders (<model>.<tag>/ with config.json) in {HUB_DIR}')
        else:
            jobs = [(args.folder, args.repo_id or f'timm-spot/{args.folder.resolve().name}', args.commit)]
        for folder, repo_id, commit in jobs:
            build_offline_cache(folder, repo_id, cache_dir, commit=commit, ref=args.ref or None,
                                link='copy' if args.copy else 'symlink')
            print(f'cached {folder} as {repo_id} in {repo_cache_folder(cache_dir, repo_id)}')
        print('load offline with: ' + ' '.join(f'{k}={v}' for k, v in offline_env(cache_dir).items()))
        return 0
    if args.command == 'verify-cache':
        from huggingface_hub import constants
        from .cache import verify_offline_cache
        problems = verify_offline_cache(args.cache_dir or constants.HF_HUB_CACHE, args.repo_id, args.revision)
        for p in problems:
            print(p)
        print('ok' if not problems else f'{len(problems)} problem(s)')
        return 0 if not problems else 1
    return 2


def cli(argv: Optional[List[str]] = None) -> int:
    """``main`` with expected failures printed as one line (tracebacks only for bugs): exit code 2 for an input
    mistake (a bad tag, file or folder), 4 for a full disk, 1 for other refusals (network, publish advice)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print('error: interrupted; an export is replaced by rename, so every folder under --out is either the old or '
              'the new one (a .<name>.export-tmp folder left behind can be deleted)', file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        from train_scripts.checkpoint import is_disk_full
        if is_disk_full(e):
            print(f'error: no space left on the device ({type(e).__name__}: {_first_line(e)}); nothing was replaced '
                  f'(a folder is swapped in only when complete): free disk space and run the command again',
                  file=sys.stderr)
            return 4
        if isinstance(e, (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                          PermissionError)):
            print(f'error: {e}', file=sys.stderr)
            return 2
        if isinstance(e, RuntimeError):
            print(f'error: {e}', file=sys.stderr)
            return 1
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == '__main__':
    sys.exit(cli())

#!/usr/bin/env python
"""Try to break the pretraining, evaluation and Hub commands on purpose (issue 12) and tabulate what happens.

    PYTHONPATH=. python benchmarks/fault_scenarios.py [--work DIR] [--json FILE]

Each attempt is a command with bad input or an injected fault (bad data, bad configs, corrupt, truncated or hostile
checkpoints, disk full, NaN, bad weights, hostile files). An earlier run's directory is snapshotted before every
attempt that touches it. Outcome classes: ``clear error`` (the expected non-zero exit code, one ``error:`` line,
no traceback), ``recovered`` (the fault was handled: a corrupt checkpoint skipped and named, an unreadable image
counted once), ``silent wrong`` (exit 0 or a result where an error was due), ``raw traceback`` (an exception escaped
or a traceback was printed), ``data loss`` (a file of the earlier run changed or vanished), ``code execution``
(a hostile file ran code). Not collected by pytest (no ``test_`` prefix); ~2-4 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

TINY = dict(
    data='builtin', img_size=32, batch_size=4, gen_stem_width=8, gen_widths=[8, 16, 32, 64],
    discriminator_kwargs={'head_hidden_size': 64}, stage1_steps=1, stage2_steps=2, history_batches=2,
    num_workers=0, threads=1, log_every=1, figure_every=0, checkpoint_every=1, keep_checkpoints=2,
    num_figure_images=2, progress=False,
)


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob('*')) if p.is_file()} if d.is_dir() else {}


def capture(fn, *args, **kwargs):
    """(return value or exception, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = fn(*args, **kwargs)
        except SystemExit as e:
            result = e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # noqa: BLE001
            result = e
            err.write(''.join(traceback.format_exception(type(e), e, e.__traceback__)))
    return result, out.getvalue(), err.getvalue()


class Table:
    def __init__(self):
        self.rows = []

    def add(self, group, name, result, out, err, expect, damaged=False, pwned=False, recovered_if=None):
        text = out + err
        errors = [line for line in err.splitlines() if line.startswith('error:')]
        if pwned:
            kind = 'code execution'
        elif damaged:
            kind = 'data loss'
        elif isinstance(result, BaseException) or 'Traceback (most recent call last)' in text:
            kind = 'raw traceback'
        elif expect == 0:
            ok = result == 0 and (recovered_if is None or recovered_if(text))
            kind = ('recovered' if recovered_if is not None else 'ok') if ok else 'silent wrong'
        elif result == expect and len(errors) == 1:
            kind = 'clear error'
        elif result == 0:
            kind = 'silent wrong'
        else:
            kind = f'unclear (exit {result}, {len(errors)} error lines)'
        message = errors[0][7:] if errors else text.strip().splitlines()[-1] if text.strip() else ''
        self.rows.append(dict(group=group, name=name, kind=kind, exit=result if isinstance(result, int) else
                              type(result).__name__, message=message[:240]))
        print(f'[{kind:>14}] {group:<9} {name:<55} exit {self.rows[-1]["exit"]}: {message[:150]}', flush=True)

    def summary(self):
        kinds = ['clear error', 'recovered', 'ok', 'silent wrong', 'raw traceback', 'data loss', 'code execution']
        counts = {k: sum(r['kind'] == k for r in self.rows) for k in kinds}
        other = len(self.rows) - sum(counts.values())
        lines = ['| attempts | clear errors | recovered / counted skips | worked as asked | silent wrong results | '
                 'raw tracebacks | data loss | code execution | other |',
                 '|---|---|---|---|---|---|---|---|---|',
                 f"| {len(self.rows)} | {counts['clear error']} | {counts['recovered']} | {counts['ok']} | "
                 f"{counts['silent wrong']} | {counts['raw traceback']} | {counts['data loss']} | "
                 f"{counts['code execution']} | {other} |"]
        return '\n'.join(lines)


def png_bytes(color=(0, 200, 0), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new('RGB', size, color).save(buf, format='PNG')
    return buf.getvalue()


def write_parquet(path: Path, cells, labels=None) -> str:
    import datasets

    cols = {'image': cells}
    feats = {'image': datasets.Image(decode=False)}
    if labels is not None:
        cols['label'] = labels
        feats['label'] = datasets.Value('float64' if isinstance(labels[0], float) else 'int64')
    datasets.Dataset.from_dict(cols, features=datasets.Features(feats)).to_parquet(str(path))
    return str(path)


def flip(path: Path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


class _Evil:
    def __reduce__(self):
        return (os.system, (f'touch {os.environ["FAULT_MARKER"]}',))


def pretrain_scenarios(work: Path, table: Table) -> None:
    from train_scripts.pretrain import main

    cfg_path = work / 'tiny.yaml'
    cfg_path.write_text(yaml.safe_dump(TINY))
    cfg = str(cfg_path)
    master = work / 'master'
    r, o, e = capture(main, ['--config', cfg, '--output-dir', str(master)])
    assert r == 0, o + e

    def fresh(name):
        d = work / name
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(master, d)
        return d

    bad_data = work / 'garbage.parquet'
    write_parquet(bad_data, [{'bytes': b'not an image', 'path': None}] * 3)
    empty_dir = work / 'empty_images'
    empty_dir.mkdir(exist_ok=True)
    txt_dir = work / 'text_files'
    txt_dir.mkdir(exist_ok=True)
    for i in range(3):
        (txt_dir / f'f{i}.png').write_text('not really a png')

    against_run = [
        ('--data typo', ['--data', str(work / 'typo.parquet')], 2),
        ('--data typo --overwrite', ['--data', str(work / 'typo.parquet'), '--overwrite'], 2),
        ('same dir, no --resume/--overwrite', [], 2),
        ('data without a readable image --overwrite', ['--data', str(bad_data), '--overwrite'], 2),
        ('empty image folder --overwrite', ['--data', str(empty_dir), '--overwrite'], 2),
        ('folder of non-images --overwrite', ['--data', str(txt_dir), '--overwrite'], 2),
        ('--image-column pixels --overwrite', ['--image-column', 'pixels', '--overwrite'], 2),
        ('--resume --img-size 64', ['--resume', '--img-size', '64'], 2),
        ('--resume gen_widths=[16,32,64,128]', ['--resume', '--set', 'gen_widths=[16,32,64,128]'], 2),
        ('--resume --batch-size 2', ['--resume', '--batch-size', '2'], 2),
        ('--resume mask_loss_weight=0', ['--resume', '--set', 'mask_loss_weight=0'], 2),
        ('--resume history_batches=3', ['--resume', '--set', 'history_batches=3'], 2),
        ('--resume /no/such/checkpoint', ['--resume', '/no/such/checkpoint'], 2),
        ('--overwrite with lr=abc', ['--overwrite', '--set', 'lr=abc'], 2),
        ('--stage 2 --overwrite, init_generator missing', ['--stage', '2', '--overwrite', '--set',
                                                           f'init_generator={work}/none.safetensors'], 2),
    ]
    for name, extra, expect in against_run:
        d = fresh('victim')
        before = snapshot(d)
        base = ['--output-dir', str(d)] + ([] if extra[:1] == ['--resume'] else ['--config', cfg])
        r, o, e = capture(main, base + extra)
        table.add('pretrain', name, r, o, e, expect, damaged=snapshot(d) != before)

    config_mistakes = [
        ('history="false"', ['--set', 'history="false"']), ("gate='no'", ['--set', "gate='no'"]),
        ('hflip=1', ['--set', 'hflip=1']), ('history_batches=-1', ['--set', 'history_batches=-1']),
        ('lr=abc', ['--set', 'lr=abc']), ('crop_scale=0.5', ['--set', 'crop_scale=0.5']),
        ('gen_widths=64', ['--set', 'gen_widths=64']), ('threads=-3', ['--set', 'threads=-3']),
        ('--stage1-epochs -2', ['--stage1-epochs', '-2']), ('img_size=100', ['--set', 'img_size=100']),
        ('keep_checkpoints=0', ['--set', 'keep_checkpoints=0']), ('debug_nan_at=abc', ['--set', 'debug_nan_at=abc']),
        ('seed=-1', ['--set', 'seed=-1']),
        ('unknown key', ['--set', 'thetaa=0.5']), ('theta=1.5', ['--theta', '1.5']),
        ('batch_size=true', ['--set', 'batch_size=true']), ('crop_ratio=[2, 1]', ['--set', 'crop_ratio=[2,1]']),
        ('generator_kwargs=3', ['--set', 'generator_kwargs=3']), ('--set without =', ['--set', 'theta']),
    ]
    for i, (name, extra) in enumerate(config_mistakes):
        d = work / f'never{i}'
        r, o, e = capture(main, ['--config', cfg, '--output-dir', str(d)] + extra)
        table.add('config', name, r, o, e, 2)  # a new dir: nothing to lose; exit 0 is a silent wrong result
    cwd = os.getcwd()
    os.chdir(work)  # an empty output_dir must not fall back to a default dir; never write into the repo
    try:
        r, o, e = capture(main, ['--config', cfg, '--set', 'output_dir='])
    finally:
        os.chdir(cwd)
    table.add('config', 'empty output_dir (--set output_dir=)', r, o, e, 2)

    files = [('malformed YAML', 'img_size: 32\ngen_widths: [8, 16\n'), ('YAML list, not a mapping', '- 1\n- 2\n'),
             ('YAML with tab indentation', 'a:\n\tb: 1\n')]
    for name, text in files:
        p = work / 'bad.yaml'
        p.write_text(text)
        r, o, e = capture(main, ['--config', str(p), '--output-dir', str(work / 'never')])
        table.add('config', name, r, o, e, 2)
    r, o, e = capture(main, ['--config', str(work / 'missing.yaml'), '--output-dir', str(work / 'never')])
    table.add('config', 'missing config file', r, o, e, 2)

    empty_run = work / 'empty_run'
    empty_run.mkdir(exist_ok=True)
    r, o, e = capture(main, ['--output-dir', str(empty_run), '--resume'])
    table.add('resume', '--resume in a dir without checkpoints', r, o, e, 2)

    # corrupt checkpoints
    def ckpts(d):
        return sorted((d / 'checkpoints').glob('stage*'))

    d = fresh('victim')
    flip(ckpts(d)[-1] / 'model.safetensors')
    r, o, e = capture(main, ['--output-dir', str(d), '--resume'])
    table.add('ckpt', 'flipped bit in latest model.safetensors', r, o, e, 0,
              recovered_if=lambda t: 'skipping checkpoint' in t and 'model.safetensors' in t)
    d = fresh('victim')
    flip(ckpts(d)[-1] / 'optimizer.bin', offset=200)
    r, o, e = capture(main, ['--output-dir', str(d), '--resume'])
    table.add('ckpt', 'flipped bit in latest optimizer.bin', r, o, e, 0,
              recovered_if=lambda t: 'skipping checkpoint' in t and 'optimizer.bin' in t)
    for victim in ('model.safetensors', 'model_1.safetensors', 'optimizer.bin', 'rank_state_0.pt',
                   'custom_checkpoint_0.pkl', 'random_states_0.pkl'):
        d = fresh('victim')
        for c in ckpts(d):
            truncate(c / victim)
        r, o, e = capture(main, ['--output-dir', str(d), '--resume'])
        table.add('ckpt', f'truncated {victim} in every checkpoint', r, o, e, 2)
    d = fresh('victim')
    for c in ckpts(d):
        (c / 'meta.json').unlink()
    r, o, e = capture(main, ['--output-dir', str(d), '--resume'])
    table.add('ckpt', 'meta.json deleted in every checkpoint', r, o, e, 2)
    d = fresh('victim')
    (d / 'checkpoints' / 'latest').write_text('{garbage')
    r, o, e = capture(main, ['--output-dir', str(d), '--resume'])
    table.add('ckpt', 'latest pointer garbage', r, o, e, 0, recovered_if=lambda t: 'resumed from' in t)
    d = fresh('victim')
    (d / 'config.yaml').write_text('img_size: [oops\n')
    r, o, e = capture(main, ['--output-dir', str(d), '--resume'])
    table.add('ckpt', 'config.yaml of the run malformed, --resume', r, o, e, 2)

    # hostile rank_state: checksums recomputed too (an attacker controls meta.json as well)
    try:
        from train_scripts.checkpoint import checkpoint_digests
    except ImportError:  # a version without checksums: nothing to forge
        def checkpoint_digests(path):
            return None
    marker = work / 'pwned'
    os.environ['FAULT_MARKER'] = str(marker)
    for where in ('rank_state_0.pt',):
        d = fresh('victim')
        for c in ckpts(d):
            torch.save({'history': _Evil(), 'stream': {}, 'meters': {}}, str(c / where))
            meta = json.loads((c / 'meta.json').read_text())
            if checkpoint_digests(str(c)) is not None:
                meta['files'] = checkpoint_digests(str(c))
            (c / 'meta.json').write_text(json.dumps(meta))
        r, o, e = capture(main, ['--output-dir', str(d), '--resume'])
        table.add('ckpt', f'hostile pickle in {where} (checksums forged)', r, o, e, 2, pwned=marker.exists())

    # disk full, NaN
    import accelerate
    real = accelerate.Accelerator.save_state
    calls = []

    def full(self, output_dir=None, **kw):
        calls.append(1)
        if len(calls) == 2:
            real(self, output_dir, **kw)
            raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 4416 vs 4304')
        return real(self, output_dir, **kw)
    accelerate.Accelerator.save_state = full
    try:
        r, o, e = capture(main, ['--config', cfg, '--output-dir', str(work / 'full1')])
    finally:
        accelerate.Accelerator.save_state = real
    table.add('disk', 'disk full in checkpoint 2 (torch zip writer)', r, o, e, 4)
    from train_scripts import outputs
    real_save = outputs.atomic_save_safetensors

    def enospc(*a, **k):
        raise OSError(28, 'No space left on device')
    outputs.atomic_save_safetensors = enospc
    try:
        r, o, e = capture(main, ['--config', cfg, '--output-dir', str(work / 'full2')])
    finally:
        outputs.atomic_save_safetensors = real_save
    table.add('disk', 'disk full writing the weights (ENOSPC)', r, o, e, 4)
    r, o, e = capture(main, ['--config', cfg, '--output-dir', str(work / 'nan'), '--set', 'debug_nan_at=2:1'])
    table.add('nan', 'NaN loss in stage 2', r, o, e, 3)

    # images
    cells = [{'bytes': png_bytes((i * 20, 0, 0)), 'path': f'ok{i}.png'} for i in range(6)]
    cells[1] = {'bytes': b'broken', 'path': 'broken1.png'}
    data = write_parquet(work / 'one_bad.parquet', cells)
    d = work / 'skips'
    r, o, e = capture(main, ['--config', cfg, '--output-dir', str(d), '--data', data, '--stage1-steps', '5'])
    recs = [json.loads(x) for x in (d / 'metrics.jsonl').read_text().splitlines()] if d.is_dir() else []
    ok = bool(recs) and recs[-1]['skipped_images'] == 1 and (o + e).count('broken1.png') == 1
    table.add('images', 'one unreadable image in 6, 5 steps', r, o, e, 0, recovered_if=lambda t: ok)


def cli_scenarios(work: Path, table: Table) -> None:
    import timm
    from safetensors.torch import save_file

    from timm_spot.cli import main as cli

    photo = work / 'photo.png'
    Image.new('RGB', (80, 64), (100, 150, 200)).save(photo)

    def disc(name, nan=False, args=None, model_args_json=True, **kw):
        kw.setdefault('head_kernel_size', 4)
        m = timm.create_model('alexnet_spot_discriminator', **kw)
        sd = {k: (torch.full_like(v, float('nan')) if nan and v.is_floating_point() else v).contiguous()
              for k, v in m.state_dict().items()}
        folder = work / name
        folder.mkdir(exist_ok=True)
        save_file(sd, str(folder / 'w.safetensors'))
        if args is not None and model_args_json:
            (folder / 'model_args.json').write_text(json.dumps({'alexnet_spot_discriminator': args}))
        return str(folder / 'w.safetensors')

    nan_w = disc('nan', nan=True)
    r, o, e = capture(cli, ['spot', str(photo), '--weights', nan_w, '--out', str(work / 's.png')])
    table.add('eval', 'spot with NaN weights', r, o, e, 2)
    r, o, e = capture(cli, ['figure', 'gradcam', str(photo), '--weights', nan_w, '--out', str(work / 'g.png')])
    table.add('eval', 'gradcam with NaN weights', r, o, e, 2)
    huge = work / 'huge.png'
    Image.new('RGB', (100, 100)).save(huge)
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000  # 10000 px: above 2 x limit, as a 14000 x 14000 image with the default limit
    try:
        r, o, e = capture(cli, ['spot', str(huge), '--img-size', '64'])
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    table.add('eval', 'spot on a decompression bomb', r, o, e, 2)
    r, o, e = capture(cli, ['spot', str(work / 'missing.png'), '--img-size', '64'])
    table.add('eval', 'spot on a missing file', r, o, e, 2)
    (work / 'text.jpg').write_text('hello')
    r, o, e = capture(cli, ['spot', str(work / 'text.jpg'), '--img-size', '64'])
    table.add('eval', 'spot on a text file', r, o, e, 2)
    (work / 'garbage.safetensors').write_bytes(b'\x00' * 100)
    r, o, e = capture(cli, ['spot', str(photo), '--weights', str(work / 'garbage.safetensors')])
    table.add('eval', 'spot with a garbage weights file', r, o, e, 2)
    r, o, e = capture(cli, ['spot', str(photo), '--weights', disc('plain'), '--img-size', '128'])
    table.add('eval', 'spot --img-size against the weights', r, o, e, 2)
    r, o, e = capture(cli, ['spot', str(photo), '--weights', disc('plain'), '--model-args', '{bad json'])
    table.add('eval', 'spot --model-args bad JSON', r, o, e, 2)
    r, o, e = capture(cli, ['--threads', '-1', 'spot', str(photo)])
    table.add('eval', '--threads -1', r, o, e, 2)
    args = {'head_kernel_size': 4, 'mask_head': False, 'head_hidden_size': 64}
    w = disc('nomask', args=args, **args)
    r, o, e = capture(cli, ['spot', str(photo), '--weights', w, '--out', str(work / 's2.png')])
    table.add('eval', 'spot, discriminator without mask head (ablation g)', r, o, e, 0,
              recovered_if=lambda t: 'no mask head' in t)
    r, o, e = capture(cli, ['figure', 'gradcam', str(photo), '--weights', w, '--out', str(work / 'g2.png')])
    table.add('eval', 'gradcam, discriminator without mask head', r, o, e, 0, recovered_if=lambda t: 'wrote' in t)
    w = disc('nomask_noargs', args=args, model_args_json=False, **args)
    r, o, e = capture(cli, ['spot', str(photo), '--weights', w, '--out', str(work / 's3.png')])
    table.add('eval', 'spot, no mask head, no model_args.json (inferred)', r, o, e, 0,
              recovered_if=lambda t: 'no mask head' in t)

    # probe
    cells = [{'bytes': png_bytes((i * 30 % 255, i * 7 % 255, 0), (16, 16)), 'path': None} for i in range(9)]
    data = write_parquet(work / 'float_labels.parquet', cells, labels=[0.0, 1.5, 2.0] * 3)
    r, o, e = capture(cli, ['probe', '--data', data, '--no-cache', '--img-size', '32', '--val-per-class', '1'])
    table.add('eval', 'probe with float labels 1.5', r, o, e, 2)
    data = write_parquet(work / 'labels.parquet', cells, labels=[0, 1, 2] * 3)
    m = timm.create_model('alexnet_spot')
    save_file({k: (torch.full_like(v, float('nan')) if v.is_floating_point() else v).contiguous()
               for k, v in m.state_dict().items()}, str(work / 'nan_backbone.safetensors'))
    r, o, e = capture(cli, ['probe', '--data', data, '--no-cache', '--img-size', '32', '--val-per-class', '1',
                            '--epochs', '1', '--weights', str(work / 'nan_backbone.safetensors')])
    table.add('eval', 'probe with NaN weights', r, o, e, 2)
    r, o, e = capture(cli, ['probe', '--data', data, '--no-cache', '--label-column', 'nope'])
    table.add('eval', 'probe --label-column missing', r, o, e, 2)


def hub_scenarios(work: Path, table: Table) -> None:
    import timm
    from safetensors.torch import save_file

    from hub.export import export_run
    from hub.publish import publish_folder

    run = work / 'hubrun'
    run.mkdir(exist_ok=True)
    m = timm.create_model('alexnet_spot')
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(run / 'alexnet_spot.safetensors'))
    (run / 'model_args.json').write_text(json.dumps({'alexnet_spot': {}, 'img_size': 64}))
    (run / 'config.yaml').write_text('data: builtin\nimg_size: 64\n')
    export_run(run, work / 'hub', verify=False, log=None)
    folder = work / 'hub' / 'alexnet_spot'
    (folder / '.env').write_text('HF_TOKEN=secret')

    env = dict(os.environ, HF_TOKEN='hf_fake_token', HF_ENDPOINT='http://127.0.0.1:9', PYTHONPATH=str(REPO),
               HF_HUB_DISABLE_TELEMETRY='1', HF_HUB_ETAG_TIMEOUT='2', HF_HUB_DOWNLOAD_TIMEOUT='2')
    proc = subprocess.run([sys.executable, '-m', 'hub', 'publish', str(folder), '--repo-id', 'someone/alexnet_spot.x'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    table.add('hub', 'publish without network', proc.returncode, proc.stdout, proc.stderr, 1)

    class Api:
        def create_repo(self, repo_id, **kw):
            return type('R', (), {'repo_id': repo_id})()

        def upload_folder(self, **kw):
            self.kw = kw
            return type('C', (), {'oid': 'a' * 40, 'commit_url': 'u', 'pr_url': None})()
    from huggingface_hub.utils import filter_repo_objects
    api = Api()
    r, o, e = capture(publish_folder, folder, 'someone/alexnet_spot.x', api=api)
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())
    sent = sorted(filter_repo_objects(on_disk, allow_patterns=getattr(api, 'kw', {}).get('allow_patterns')))
    listed = sorted(f['path'] for f in r['files']) if isinstance(r, dict) else []
    table.add('hub', 'publish a folder holding .env', 0 if isinstance(r, dict) else r, o, e, 0,
              recovered_if=lambda t: sent == listed and '.env' not in sent)

    from hub import export as export_mod
    before = snapshot(folder)
    real = os.replace

    def killed(src, dst):
        if str(src).endswith('.export-tmp'):
            raise KeyboardInterrupt
        return real(src, dst)
    export_mod.os.replace = killed
    try:
        r, o, e = capture(export_run, run, work / 'hub', verify=False, log=None)
    finally:
        export_mod.os.replace = real
    survivors = [p for p in (folder, work / 'hub' / '.alexnet_spot.export-old') if p.is_dir()]
    lost = not survivors or snapshot(survivors[0]) != before
    table.add('hub', 'export killed between the renames', 0, '', '', 0, damaged=lost,
              recovered_if=lambda t: not lost)
    (folder / 'notes.txt').write_text('mine')
    r, o, e = capture(lambda: (export_run(run, work / 'hub', verify=False, log=None), 0)[1])
    table.add('hub', 'export over a folder holding foreign files', r if r == 0 else 2 if isinstance(
        r, FileExistsError) else r, o, 'error: ' + str(r) if isinstance(r, FileExistsError) else e, 2,
              damaged=not (folder / 'notes.txt').is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--work', default=None, help='scratch folder (default: a temporary one, removed)')
    parser.add_argument('--json', default=None, help='write every attempt as JSON')
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work or tempfile.mkdtemp(prefix='faults-'))
    work.mkdir(parents=True, exist_ok=True)
    table = Table()
    try:
        pretrain_scenarios(work, table)
        cli_scenarios(work, table)
        hub_scenarios(work, table)
    finally:
        print()
        print(table.summary())
        if args.json:
            Path(args.json).write_text(json.dumps(table.rows, indent=1))
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

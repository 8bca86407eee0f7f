"""File helpers shared by export, publish and the offline cache: hashes, listings, safetensors headers."""
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from timm_spot.hashing import file_sha256

PathLike = Union[str, os.PathLike]

_CHUNK = 1 << 20

# Suffixes the Hub's default .gitattributes stores with Git LFS (a subset: the ones a model repo may hold).
LFS_SUFFIXES = (
    '.safetensors', '.bin', '.pt', '.pth', '.ckpt', '.h5', '.msgpack', '.onnx', '.npz', '.npy', '.pkl', '.pickle',
    '.tar', '.tgz', '.gz', '.zip', '.zst', '.xz', '.parquet', '.arrow', '.tflite', '.pb', '.model',
)
# The Hub also stores any file above 10 MB with LFS, whatever its name.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024


def git_blob_sha1(path: PathLike) -> str:
    """The git object id of a file (what the Hub reports as the ETag of a file stored in git, not LFS)."""
    size = os.path.getsize(path)
    h = hashlib.sha1()
    h.update(b'blob %d\0' % size)
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(_CHUNK), b''):
            h.update(chunk)
    return h.hexdigest()


def is_lfs_file(path: PathLike) -> bool:
    name = os.path.basename(str(path)).lower()
    return name.endswith(LFS_SUFFIXES) or os.path.getsize(path) > LFS_SIZE_THRESHOLD


def blob_id(path: PathLike) -> str:
    """Name of the file's blob in a Hugging Face cache: sha256 for LFS files, the git blob sha1 otherwise."""
    return file_sha256(path) if is_lfs_file(path) else git_blob_sha1(path)


def list_repo_files(folder: PathLike) -> List[Tuple[str, Path]]:
    """Files of a repo folder as (posix path in repo, path on disk), sorted; hidden files and folders skipped."""
    folder = Path(folder)
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.') and d != '__pycache__')
        for fn in sorted(files):
            if fn.startswith('.'):
                continue
            p = Path(root) / fn
            out.append((p.relative_to(folder).as_posix(), p))
    return sorted(out)


def describe_files(folder: PathLike) -> List[Dict[str, object]]:
    """[{'path', 'size', 'sha256', 'lfs'}] for every file of a repo folder."""
    return [
        dict(path=rel, size=p.stat().st_size, sha256=file_sha256(p), lfs=is_lfs_file(p))
        for rel, p in list_repo_files(folder)
    ]


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 less the umask, usually 0o644): what a temporary file renamed
    into place must get instead of mkstemp's private 0o600, so published files are readable by others."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def human_size(n: int) -> str:
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if n < 1024 or unit == 'GiB':
            return f'{n} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024.0
    return f'{n} B'


# ----------------------------------------------------------------------------------------------------------------
# safetensors headers
# ----------------------------------------------------------------------------------------------------------------

def read_safetensors_header(path: PathLike) -> Dict[str, dict]:
    """The JSON header of a safetensors file (tensor entries and ``__metadata__``), without reading the data."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f'{path}: not a safetensors file (shorter than 8 bytes)')
        (n,) = struct.unpack('<Q', raw)
        if n > size - 8 or n > 100 * 1024 * 1024:
            raise ValueError(f'{path}: not a safetensors file or truncated (header length {n}, file size {size})')
        header = json.loads(f.read(n).decode('utf-8'))
    end = max((v['data_offsets'][1] for k, v in header.items() if k != '__metadata__'), default=0)
    if 8 + n + end != size:
        raise ValueError(f'{path}: truncated or padded safetensors file ({size} bytes, header says {8 + n + end})')
    return header


def canonicalize_safetensors(path: PathLike) -> None:
    """Rewrite a safetensors header deterministically (sorted metadata, tensors in data order), data untouched.

    The Rust writer serialises ``__metadata__`` from a hash map, so its key order (and the file's sha256) changes
    from run to run; a canonical header makes an export byte-reproducible.
    """
    path = Path(path)
    header = read_safetensors_header(path)
    with open(path, 'rb') as f:
        (n,) = struct.unpack('<Q', f.read(8))
    meta = header.pop('__metadata__', None)
    canon: Dict[str, object] = {}
    if meta is not None:
        canon['__metadata__'] = {k: meta[k] for k in sorted(meta)}
    for k in sorted(header, key=lambda k: (header[k]['data_offsets'][0], header[k]['data_offsets'][1], k)):
        canon[k] = header[k]
    text = json.dumps(canon, separators=(',', ':')).encode('utf-8')
    text += b' ' * (-len(text) % 8)  # safetensors pads the header to 8-byte alignment with spaces
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix='.' + path.name, suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as out, open(path, 'rb') as src:
            out.write(struct.pack('<Q', len(text)))
            out.write(text)
            src.seek(8 + n)
            shutil.copyfileobj(src, out, _CHUNK)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def public_data_source(source: Optional[str]) -> Optional[str]:
    """A data source as published files name it: no machine paths.

    Hub dataset ids and ``builtin`` stay as they are; a local path under ``$TIMM_SPOT_DATA`` becomes
    ``$TIMM_SPOT_DATA/<relative path>``; any other local path ``local:<parent folder>/<file name>``.
    """
    if not source or not isinstance(source, str):
        return source
    is_path = source.startswith(('.', '/', '~', '$')) or os.path.exists(source) or \
        source.endswith(('.parquet', '.arrow', '.csv', '.json', '.jsonl')) or source.count('/') > 1
    if not is_path:
        return source
    root = os.environ.get('TIMM_SPOT_DATA')
    path = Path(os.path.expanduser(source))
    if root:
        try:
            return '$TIMM_SPOT_DATA/' + path.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            pass
    if source.startswith('$TIMM_SPOT_DATA/'):
        return source
    return 'local:' + '/'.join(path.parts[-2:])

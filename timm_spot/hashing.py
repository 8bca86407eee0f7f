"""The project's one file-hash helper."""
from __future__ import annotations

import os
from typing import Union


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """Hex sha256 of a file's bytes, streamed (huggingface_hub's own helper, the hash the Hub's LFS uses).
    The checkpoints, the run's weight record, the Hub exporter and the feature cache use it."""
    from huggingface_hub.utils.sha import sha_fileobj

    with open(path, 'rb') as f:
        return sha_fileobj(f).hex()

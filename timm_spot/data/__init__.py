"""Image data through Hugging Face ``datasets``: where images come from and how they are decoded."""
from .sources import (
    BUILTIN_SOURCE,
    builtin_sample_images,
    check_columns,
    decode_image,
    holdout_split,
    load_image_source,
)

__all__ = [
    'BUILTIN_SOURCE', 'builtin_sample_images', 'check_columns', 'decode_image', 'holdout_split', 'load_image_source',
]

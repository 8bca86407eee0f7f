"""timm-spot: "Self-Supervised Feature Learning by Learning to Spot Artifacts" as a timm plugin.

Importing this package registers the models with timm's registry, so that
``timm.create_model('alexnet_spot')`` works anywhere after ``import timm_spot``.
"""
from .models import *  # noqa: F401,F403  (registers the models with timm)

__version__ = "0.1.0"

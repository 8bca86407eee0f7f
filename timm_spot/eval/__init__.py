"""Evaluation tools: layerwise linear probes (paper Tables 4/5), the STL-10 transfer protocol (Table 2), figures
(Figs. 7a, 8, 9 and the ``spot`` artifact map) and a wrapper that runs timm's own train/validate/inference scripts.

Command line: ``timm-spot --help`` (``timm_spot.cli``).
"""
from .labelled import LabelledData, check_num_classes, load_labelled, open_image
from .features import TARGET_DIM, FeatureSet, TapExtractor, create_backbone, extract_features, load_or_extract, \
    pooled_grid, tap_table
from .probe import ProbeConfig, format_table, train_linear_probes
from .protocols import layerwise_probe, load_folds, transfer_eval

__all__ = [
    'LabelledData', 'check_num_classes', 'load_labelled', 'open_image',
    'TARGET_DIM', 'FeatureSet', 'TapExtractor', 'create_backbone', 'extract_features', 'load_or_extract',
    'pooled_grid', 'tap_table',
    'ProbeConfig', 'format_table', 'train_linear_probes',
    'layerwise_probe', 'load_folds', 'transfer_eval',
]

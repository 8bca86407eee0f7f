"""Pretraining pipeline of timm-spot ("Learning to Spot Artifacts", Jenni & Favaro, CVPR 2018).

Entry point: ``python train_scripts/pretrain.py`` (or ``accelerate launch train_scripts/pretrain.py``); with
no arguments it runs the demo (``configs/demo.yaml``) on scikit-image's bundled photos. See ``--help``.

Modules: ``config`` (defaults, ablation presets, YAML + CLI overrides), ``data`` (Hugging Face ``datasets``
sources, deterministic augmentation, per-process sharding), ``losses`` (every loss term of the recipe),
``history`` (SimGAN history buffer), ``gan`` (DCGAN generator of ablation (l)), ``checkpoint`` (atomic writes,
resumable Accelerate checkpoints), ``figures`` (Figure-3 grids), ``trainer`` (the two training stages),
``benchmark`` (training throughput).
"""

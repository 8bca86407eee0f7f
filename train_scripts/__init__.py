"""Pretraining pipeline of timm-spot ("Learning to Spot Artifacts", Jenni & Favaro, CVPR 2018).

Entry point: ``python train_scripts/pretrain.py`` (or ``accelerate launch train_scripts/pretrain.py``); with
no arguments it runs the demo (``configs/demo.yaml``) on scikit-image's bundled photos. See ``--help``.
The modules, in the order to read them, are listed in train_scripts/README.md ("Reading order").
"""

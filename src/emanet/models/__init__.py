"""The networks: backbone.py (dilated ResNets and the RESNETS depth table), backbone_weights.py (reading backbone
weight files and loading them key by key), heads.py (the EMA head and its baselines), emanet.py (ModelConfig,
backbone -> head assembly, the keyword-only builders) and fuse.py (inference: BatchNorm folding,
conv+ReLU(+add) fusion on CPU, channels_last)."""

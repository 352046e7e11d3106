"""mia-gen's Hydra configs, shipped as package data (`experiments/common.py` finds them; README "Layout")."""

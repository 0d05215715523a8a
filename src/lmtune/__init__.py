"""lmtune: pretrain, fine-tune, evaluate and apply language models on one small training loop."""

__version__ = "0.1.0"

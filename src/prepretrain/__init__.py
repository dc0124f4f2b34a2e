"""prepretrain: the training side of the MAWS recipe (MAE pre-pretraining -> WSP -> transfer)."""

__version__ = "0.1.0"

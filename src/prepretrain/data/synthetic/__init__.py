"""The embedded synthetic dataset: drawn in memory (:mod:`.images`), written to disk (:mod:`.export`)."""

from prepretrain.data.synthetic.images import SyntheticSource, synthetic_split_sizes

__all__ = ["SyntheticSource", "synthetic_split_sizes"]

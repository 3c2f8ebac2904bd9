"""Video data sets: a built-in synthetic one and loaders for real layouts."""

from .synthetic import MOTIONS, Motion, SyntheticVideoDataset

__all__ = ["SyntheticVideoDataset", "Motion", "MOTIONS"]

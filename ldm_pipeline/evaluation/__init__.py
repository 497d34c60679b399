"""Measure a model: FID (`fid`), CLIP score (`clip`), prompt accuracy on shapes (`judge`, `accuracy`), reports."""

from .clip import Clip
from .features import ClipFeatures, InceptionFeatures
from .fid import FeatureStats, cached_stats, feature_stats, fid, frechet_distance

__all__ = ["Clip", "ClipFeatures", "FeatureStats", "InceptionFeatures", "cached_stats", "feature_stats", "fid",
           "frechet_distance"]

"""Fréchet distance between two sets of image features (FID, Heusel et al. 2017), and cached statistics.

FID fits a Gaussian to each set of features and measures

    d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)).

It is a pure function of the two feature sets: which network made the features (Inception-v3,
a CLIP vision tower) is the caller's choice, and numbers made with different extractors must
never be compared.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image

from ..files import atomic_path


@dataclass(frozen=True)
class FeatureStats:
    """The Gaussian fitted to a feature set: mean (D,), covariance (D, D) and sample count."""

    mean: np.ndarray
    cov: np.ndarray
    n: int


def feature_stats(features: np.ndarray) -> FeatureStats:
    """Mean and (unbiased) covariance of `features`, shape (N, D) with N >= 2, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"`features`: got shape {features.shape}; expected (N, D) with N >= 2")
    return FeatureStats(features.mean(axis=0), np.cov(features, rowvar=False), len(features))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix through its eigendecomposition."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def trace_sqrt_product(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """tr((S_a S_b)^(1/2)) for covariance matrices, without a general (complex) matrix square root.

    S_a S_b is not symmetric, so `scipy.linalg.sqrtm` on it can return complex values or
    fail when the covariances are singular (fewer samples than dimensions). It is similar to
    the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2), which has the same eigenvalues; the trace
    of the root is the sum of their square roots, clipped at zero against round-off.
    """
    root_a = _sqrt_psd(cov_a)
    values = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    return float(np.sqrt(np.clip(values, 0, None)).sum())


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """The squared Fréchet distance between the Gaussians of two feature sets (what papers call FID)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature sizes differ: {a.mean.shape[0]} and {b.mean.shape[0]}; "
                         "both sets must come from the same extractor")
    diff = a.mean - b.mean
    distance = diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2 * trace_sqrt_product(a.cov, b.cov)
    return max(float(distance), 0.0)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature arrays (N_a, D) and (N_b, D)."""
    return frechet_distance(feature_stats(features_a), feature_stats(features_b))


# -- cached statistics of a fixed image set ----------------------------------------------------

def default_cache_dir() -> Path:
    """`$LDM_CACHE_DIR/fid`, else `~/.cache/ldm_pipeline/fid`."""
    root = os.environ.get("LDM_CACHE_DIR") or Path.home() / ".cache" / "ldm_pipeline"
    return Path(root) / "fid"


def images_hash(images: list[PIL.Image.Image], extractor_name: str) -> str:
    """A digest of the extractor's name and every image's size and RGB pixels, in order."""
    digest = hashlib.sha256(extractor_name.encode())
    for image in images:
        rgb = image.convert("RGB")
        digest.update(f"{rgb.width}x{rgb.height};".encode())
        digest.update(rgb.tobytes())
    return digest.hexdigest()


def cached_stats(images: list[PIL.Image.Image], extractor: Callable, cache_dir: str | os.PathLike | None = None
                 ) -> FeatureStats:
    """Feature statistics of `images`, computed once and then read from a cache keyed by their hash.

    Args:
        images: the image set (e.g. the real images FID compares against).
        extractor: a feature extractor with a `name` (see `features.py`); it is part of the key.
        cache_dir: where the `.npz` files go (default: `default_cache_dir()`).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"{images_hash(images, extractor.name)[:24]}.npz"
    if path.exists():
        with np.load(path) as saved:
            return FeatureStats(saved["mean"], saved["cov"], int(saved["n"]))
    stats = feature_stats(extractor(images))
    with atomic_path(path) as partial:  # a stop mid-write leaves no broken cache
        np.savez(partial, mean=stats.mean, cov=stats.cov, n=stats.n, extractor=extractor.name)
    return stats

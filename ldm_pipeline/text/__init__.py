"""Prompts to text embeddings: tokenising in 75-token windows, `(word:1.3)` weighting (`windows`),
encoding with a cache (`encode`), and cross-attention keys computed once per call (`keys`).
"""

from .encode import EmbeddingCache, encode_prompts, encode_windows

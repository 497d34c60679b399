"""The CLIP that evaluation measures with (CLIP score, CLIP features for FID, the judge's helpers).

It lives in `ldm_pipeline.guidance.clip_model`, a floor below, because CLIP guidance at sampling time uses it too.
"""

from ..guidance.clip_model import OPENAI_MEAN, OPENAI_STD, SHAPES_CLIP, Clip, Preprocess, resize, weights_digest

__all__ = ["OPENAI_MEAN", "OPENAI_STD", "SHAPES_CLIP", "Clip", "Preprocess", "resize", "weights_digest"]

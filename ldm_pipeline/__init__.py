"""ldm-pipeline: a small, readable latent text-to-image diffusion pipeline.

    from ldm_pipeline import LatentDiffusionPipeline
    pipe = LatentDiffusionPipeline.from_pretrained("path/or/hub-id")
    image = pipe("a red circle in the top left", seed=0).images[0]
"""

from .images import load_image, make_grid
from .loading import ModelNotFoundError
from .pipeline import DEFAULT_MODEL, LatentDiffusionPipeline, PipelineOutput
from .schedulers import SCHEDULERS

__all__ = ["DEFAULT_MODEL", "LatentDiffusionPipeline", "ModelNotFoundError", "PipelineOutput", "SCHEDULERS",
           "load_image", "make_grid"]
__version__ = "0.1.0"

"""ldm-pipeline: a small, readable latent text-to-image diffusion pipeline.

    from ldm_pipeline import LatentDiffusionPipeline
    pipe = LatentDiffusionPipeline.from_pretrained("path/or/hub-id")
    image = pipe("a red circle in the top left", seed=0).images[0]
"""

from .clip_model import Clip
from .guards import NonFiniteError
from .images import load_image, make_grid
from .loading import ModelFileError, ModelNotFoundError
from .pipeline import DEFAULT_MODEL, LatentDiffusionPipeline, PipelineOutput
from .recipes import Recipe, read_recipe, read_recipes
from .schedulers import SCHEDULERS

__all__ = ["Clip", "DEFAULT_MODEL", "LatentDiffusionPipeline", "ModelFileError", "ModelNotFoundError", "NonFiniteError", "PipelineOutput",
           "Recipe", "SCHEDULERS", "load_image", "make_grid", "read_recipe", "read_recipes"]
__version__ = "0.1.0"

"""ldm-pipeline: a small, readable latent text-to-image diffusion pipeline.

    from ldm_pipeline import LatentDiffusionPipeline
    pipe = LatentDiffusionPipeline.from_pretrained("path/or/hub-id")
    image = pipe("a red circle in the top left", seed=0).images[0]

The house, a floor per folder (imports only run downwards): `apps/` (CLI, web page, prompt files)
-> `pipeline` (the class users hold) and `settings` (every call setting, once) -> `guidance/`,
`text/`, `sampling/`, `loading/`, `fast/`, `runtime/`, `provenance/`, `adapters/` -> `images`,
`files`. `shapes/` is the synthetic data set; `training/` and `evaluation/` sit beside the apps.
"""

import importlib

from .guidance.clip_model import Clip
from .images import load_image, make_grid
from .loading.folders import ModelFileError, ModelNotFoundError
from .pipeline import DEFAULT_MODEL, LatentDiffusionPipeline, PipelineOutput
from .pipeline_xl import LatentDiffusionXLPipeline
from .provenance.png import read_recipe, read_recipes
from .provenance.recipes import Recipe
from .runtime.guards import NonFiniteError
from .sampling.schedulers import SCHEDULERS
from .settings import GenerationSettings

__all__ = ["Clip", "DEFAULT_MODEL", "GenerationSettings", "LatentDiffusionPipeline", "LatentDiffusionXLPipeline",
           "ModelFileError", "ModelNotFoundError", "NonFiniteError", "PipelineOutput", "Recipe", "SCHEDULERS",
           "load_image", "make_grid", "read_recipe", "read_recipes"]
__version__ = "0.1.0"

# `from ldm_pipeline import previews` (and the other modules that once sat at the top) finds the module
# where it lives now; loaded on first use, so `import ldm_pipeline` stays light.
_MODULES = {
    "adapters": "adapters.lora", "batch": "apps.prompt_files", "checks": "runtime.checks", "cli": "apps.cli",
    "clip_model": "guidance.clip_model", "components": "loading.random_components",
    "composition": "guidance.composition", "digests": "provenance.hashes", "fast": "fast.compile",
    "guards": "runtime.guards", "guidance": "guidance.clip", "infotext": "provenance.infotext",
    "latents": "sampling.latents", "loading": "loading.folders", "memory": "runtime.memory",
    "model_hash": "provenance.hashes", "previews": "sampling.previews", "probes": "sampling.probes",
    "prompts": "text.windows", "recipes": "provenance.recipes", "sampling": "sampling.loop",
    "schedulers": "sampling.schedulers", "single_file": "loading.single_file", "text": "text.encode",
    "text_keys": "text.keys", "web": "apps.web",
}


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f".{_MODULES[name]}", __name__)
    raise AttributeError(f"module 'ldm_pipeline' has no attribute {name!r}")

"""Fast mode: one switch that draws in a step or a few, with a latent-consistency LoRA (LCM-LoRA).

`pipe.enable_fast()` loads the model's own LCM-LoRA (the bundled model names
`models/shapes-lcm-lora` in its `ldm_pipeline.json` as "fast_lora"), or the one given (a folder, a
file or a Hub id such as "latent-consistency/lcm-lora-sdv1-5"), fuses it into the weights (so that
`compile()` runs it like the base model), and switches the scheduler and the defaults to the
LoRA's: its folder's `ldm_pipeline.json` names them ({"scheduler": "lcm", "num_inference_steps": 1,
"guidance_scale": 1.0} for the bundled one); a LoRA without that file gets diffusers' LCM-LoRA
advice, the lcm scheduler at 4 steps and guidance 1. Steps and guidance given to a call still win.

`pipe.disable_fast()` puts back the exact weights, the scheduler and the defaults. The adapter stays
loaded but inactive, so that switching back on costs a fuse, not a file read. Recipes of images
drawn in fast mode say so (`Recipe.fast`), and `reproduce` switches it on for them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..loading.folders import DEFAULTS_FILE, is_hub_id

ADAPTER = "fast"  # the adapter's name in the pipeline's LoRA ledger
LCM_ADVICE = {"scheduler": "lcm", "num_inference_steps": 4, "guidance_scale": 1.0}
SETTINGS = ("num_inference_steps", "guidance_scale")  # the defaults a fast LoRA replaces


@dataclass
class FastMode:
    """What enable_fast changed, to put back."""

    source: str  # the LoRA's folder, file or Hub id
    scheduler: object  # the scheduler before
    defaults: dict  # the generation defaults before


def model_fast_lora(folder: Path, defaults: dict) -> dict:
    """The model folder's "fast_lora" made absolute (it is written relative to the folder), if it names one."""
    value = defaults.get("fast_lora")
    if value is None:
        return defaults
    if not isinstance(value, str) or not value:
        raise ValueError(f"{folder / DEFAULTS_FILE}: \"fast_lora\" is {value!r}; expected a LoRA folder (relative "
                         "to the model folder) or a Hub id")
    local = (folder / value).resolve()
    return {**defaults, "fast_lora": str(local) if local.exists() or not is_hub_id(value) else value}


def lora_settings(source: str) -> dict:
    """The scheduler, steps and guidance a fast LoRA draws with: its folder's `ldm_pipeline.json`, else LCM's advice."""
    path = Path(source)
    folder = path if path.is_dir() else path.parent if path.is_file() else None
    stored = {}
    if folder is not None and (folder / DEFAULTS_FILE).is_file():
        stored = json.loads((folder / DEFAULTS_FILE).read_text())
    return {**LCM_ADVICE, **{k: v for k, v in stored.items() if k in LCM_ADVICE}}


def _source(pipe, lora) -> str:
    if lora is None:
        lora = pipe.defaults.get("fast_lora")
        if lora is None:
            raise ValueError("`lora`: this model names no fast LoRA (its ldm_pipeline.json has no \"fast_lora\"); "
                             "pass an LCM-LoRA folder, file or Hub id, e.g. \"latent-consistency/lcm-lora-sdv1-5\" "
                             "for SD 1.5")
    if not isinstance(lora, (str, os.PathLike)):
        raise TypeError(f"`lora`: got {type(lora).__name__}; expected an LCM-LoRA folder, file or Hub id")
    return str(lora)


def enable(pipe, lora=None) -> None:
    """`LatentDiffusionPipeline.enable_fast`."""
    from ..sampling import schedulers

    source = _source(pipe, lora)
    if pipe.fast_mode is not None and pipe.fast_mode.source == source:
        return
    if ADAPTER in pipe.loras and pipe.fast_loaded != source:  # refused before anything changes
        raise ValueError(f"`lora`: an adapter named {ADAPTER!r} is loaded ({pipe.fast_loaded or 'by load_lora_weights'}),"
                         f" not {source!r}; unload_lora_weights() first")
    disable(pipe)
    if any(entry.fused for entry in pipe.loras.values()):
        raise ValueError("enable_fast: LoRA adapters are fused into the weights; unfuse_lora() first")
    settings = lora_settings(source)
    scheduler = schedulers.make_scheduler(settings["scheduler"], pipe.scheduler.config)  # checks the name first
    acting = [name for name in pipe.active_loras if name != ADAPTER]
    if ADAPTER not in pipe.loras:
        pipe.load_lora_weights(source, adapter_name=ADAPTER)
        pipe.fast_loaded = source
    pipe.set_adapters([*acting, ADAPTER], [*(pipe.loras[n].scale for n in acting), 1.0])
    pipe.fuse_lora(adapter_names=[ADAPTER])
    pipe.fast_mode = FastMode(source, pipe.scheduler, dict(pipe.defaults))
    pipe.scheduler = scheduler
    pipe.defaults = {**pipe.defaults, **{k: settings[k] for k in SETTINGS}}
    pipe.defaults.pop("regions_guidance_scale", None)  # a base model's guidance for regions does not apply


def disable(pipe) -> None:
    """`LatentDiffusionPipeline.disable_fast`: the weights, scheduler and defaults from before enable_fast."""
    mode = pipe.fast_mode
    if mode is None:
        return
    pipe.unfuse_lora()
    pipe.set_adapters([name for name in pipe.active_loras if name != ADAPTER])
    pipe.scheduler, pipe.defaults, pipe.fast_mode = mode.scheduler, mode.defaults, None


def recipe_of(pipe) -> dict:
    """The `Recipe` field: {"fast": True} while fast mode is on."""
    return {"fast": True} if pipe.fast_mode is not None else {}


class FastMethods:
    """The pipeline's fast-mode methods; the work is in this module's functions."""

    fast_mode: FastMode | None = None  # set while fast mode is on
    fast_loaded: str | None = None  # the source of the loaded fast adapter (it stays loaded when switched off)

    def enable_fast(self, lora: str | os.PathLike | None = None):
        """Draw in a step or a few: fuse an LCM-LoRA (default: the model's own) and switch to its scheduler,
        steps and guidance. Returns self."""
        enable(self, lora)
        return self

    def disable_fast(self):
        """Undo `enable_fast`: the exact weights, scheduler and defaults from before. Returns self."""
        disable(self)
        return self

    def unload_lora_weights(self):
        """Remove every LoRA, the fast one too (fast mode ends first). Returns self."""
        disable(self)
        self.fast_loaded = None
        return super().unload_lora_weights()

    @property
    def fast(self) -> bool:
        """Whether fast mode is on."""
        return self.fast_mode is not None

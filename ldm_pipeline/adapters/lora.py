"""LoRA adapters (Hu et al. 2021) on the UNet and the text encoders: load, weigh, fuse, unload.

Files in diffusers' format (what `StableDiffusionPipeline.save_lora_weights` writes: a folder with
`pytorch_lora_weights.safetensors`, keys under `unet.` and `text_encoder.`, for SDXL also
`text_encoder_2.`) and in kohya's (`lora_unet_..._lora_down.weight`, `lora_up`, `alpha`, `lora_te_...`;
for SDXL `lora_te1_...`, `lora_te2_...` and the original UNet's block names) are read with diffusers'
conversion (`lora_state_dict`, given an SDXL UNet's config as diffusers' SDXL pipelines give it) and
injected with peft through diffusers' `load_lora_into_unet` / `load_lora_into_text_encoder` (once per
text encoder), so the same file gives the same layers as in diffusers. What this module adds:

- modules of the file that no layer of the model took are named in a warning (shared LoRAs often
  carry keys a converter drops, and then have less effect than their author's); a file that
  adapts nothing is refused;
- a failed load leaves the models exactly as they were (every replaced submodule is put back);
- every change clears the pipeline's prompt-embedding caches (a text-encoder LoRA changes the
  embeddings), and `unfused(pipe)` tells the compiled path to run the UNet eagerly while unfused
  adapters act (a package holds plain weights; fusing changes the weights, which it notices);
- the pipeline keeps a ledger of what is loaded (name, scale, file, SHA-256) for recipes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import kohya_names
from .files import file_modules, read_state_dict


@dataclass
class Lora:
    """One loaded adapter, as the pipeline's ledger and recipes keep it."""

    name: str
    scale: float
    path: str | None  # the file, or None for a state dict
    sha256: str | None  # of the file's bytes (A1111 shows the first 12 hex digits)
    modules: int  # how many layers of the UNet and text encoder it adapts
    fused: bool = False


# -- reading a file ----------------------------------------------------------------------------

# -- the models' peft layers -------------------------------------------------------------------

def _tuner_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def _models(pipe) -> list[tuple[str, torch.nn.Module]]:
    """The models LoRA layers go on, by component name: the UNet and each text encoder (SDXL: two; a
    refiner: the second only)."""
    return [("unet", pipe.unet), *((name, model) for name, model in pipe.named_models
                                   if name.startswith("text_encoder"))]


def adapted_modules(pipe, adapter: str) -> dict[str, list[str]]:
    """The module paths of each model that carry `adapter`."""
    return {kind: [name for name, layer in _tuner_layers(model) if adapter in getattr(layer, "lora_A", {})]
            for kind, model in _models(pipe)}


def unused_modules(names: list[str], loaded: dict[str, list[str]], layers_per_block: int) -> list[str]:
    """The file's module names that no loaded layer answers to (kohya and diffusers spellings)."""
    taken = set().union(*(kohya_names.file_names(kind, paths, layers_per_block) for kind, paths in loaded.items()))
    return [name for name in names if name not in taken]


def _snapshot(model) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    return [(parent, name, child) for parent in model.modules() for name, child in parent._modules.items()]


def _restore(model, snapshot, attributes: dict) -> None:
    for parent, name, child in snapshot:
        parent._modules[name] = child
    for key, value in attributes.items():
        if value is None:
            model.__dict__.pop(key, None)
        else:
            setattr(model, key, value)


_PEFT_ATTRIBUTES = ("peft_config", "_hf_peft_config_loaded")


# -- the operations ----------------------------------------------------------------------------

def check_scale(name: str, scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"`{name}`: got {scale!r}; expected a number (1.0: the LoRA as trained, 0: off)")
    if not math.isfinite(scale):
        raise ValueError(f"`{name}`: got {scale!r}; expected a finite number")
    return float(scale)


def _check_adapter_name(pipe, adapter_name) -> str:
    if adapter_name is None:
        return f"default_{len(pipe.loras)}"
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"`adapter_name`: got {adapter_name!r}; expected a non-empty string")
    if "." in adapter_name or hasattr(torch.nn.ModuleDict(), adapter_name):
        # peft keeps each adapter's layers in a ModuleDict under its name: "half", "cuda", "a.b" fail there
        raise ValueError(f"`adapter_name`: {adapter_name!r} cannot name a submodule (a '.' or the name of a "
                         "torch.nn.Module attribute such as 'half' or 'float'); pick another name")
    if adapter_name in pipe.loras:
        raise ValueError(f"`adapter_name`: {adapter_name!r} is already loaded; pick another name, or "
                         "unload_lora_weights() first")
    return adapter_name


def _convert(pipe, state: dict, path: str | None) -> tuple[dict, dict | None, dict | None]:
    """diffusers' reading of the file (its tensors, network alphas, metadata), kohya's keys converted; for SDXL
    with the UNet's config, as diffusers' SDXL pipelines pass it, which maps the original UNet's block names
    (`input_blocks.4.1`, kohya's SDXL files) onto diffusers'."""
    from diffusers import StableDiffusionPipeline as loader  # its LoRA class methods are SDXL's too

    extra = dict(unet_config=pipe.unet.config) if pipe.added_layout is not None else {}
    try:
        if path is not None and path.endswith(".safetensors"):  # from the file: its header keeps lora_alpha
            return loader.lora_state_dict(str(Path(path).parent), weight_name=Path(path).name,
                                          return_lora_metadata=True, **extra)
        return loader.lora_state_dict(dict(state), return_lora_metadata=True, **extra)
    except Exception as error:
        raise ValueError(f"`path_or_folder`: {path or 'the state dict'} is not a LoRA diffusers can read "
                         f"({type(error).__name__}: {error})") from None


def _inject(pipe, converted: dict, alphas, metadata, adapter_name: str) -> None:
    """diffusers' injection of the adapter into the UNet and each text encoder (keys under its component name)."""
    from diffusers import StableDiffusionPipeline as loader  # its class methods serve SDXL's towers too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported by the caller, by module name
        for kind, model in _models(pipe):
            if kind == "unet":
                loader.load_lora_into_unet(converted, alphas, model, adapter_name=adapter_name, metadata=metadata)
            else:
                loader.load_lora_into_text_encoder(converted, alphas, model, prefix=kind, adapter_name=adapter_name,
                                                   metadata=metadata)


def _take_out(pipe, adapter_name: str, snapshots: dict) -> None:
    """Undo a failed load: the adapter's layers deleted, every replaced submodule put back."""
    for kind, model in _models(pipe):
        for _, layer in _tuner_layers(model):
            if adapter_name in layer.lora_A:  # layers that were adapters' before: the ModuleDicts stay
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # peft: "Adapter ... was active which is now deleted"
                    layer.delete_adapter(adapter_name)
        getattr(model, "peft_config", {}).pop(adapter_name, None)
        _restore(model, *snapshots[kind])
    _apply(pipe, pipe.active_loras, {name: entry.scale for name, entry in pipe.loras.items()})


def _failure(error: Exception, path: str | None) -> Exception:
    if isinstance(error, (ValueError, TypeError)) and str(error).startswith("`"):
        return error
    lines = str(error).strip().splitlines() or [""]
    more = f" (and {len(lines) - 2} more lines)" if len(lines) > 2 else ""
    reason = " ".join(line.strip() for line in lines[:2]) + more
    return ValueError(f"`path_or_folder`: {path or 'the state dict'} does not fit this model; nothing was "
                      f"changed ({type(error).__name__}: {reason})")


def load(pipe, source, adapter_name: str | None, scale: float, weight_name: str | None,
         allow_pickle: bool) -> Lora:
    """`LatentDiffusionPipeline.load_lora_weights`: read, check, inject, weigh, record."""
    scale = check_scale("scale", scale)
    adapter_name = _check_adapter_name(pipe, adapter_name)
    state, path, sha = read_state_dict(source, weight_name, allow_pickle)
    names = file_modules(state)
    converted, alphas, metadata = _convert(pipe, state, path)
    snapshots = {kind: (_snapshot(model), {a: model.__dict__.get(a) for a in _PEFT_ATTRIBUTES})
                 for kind, model in _models(pipe)}
    try:
        _inject(pipe, converted, alphas, metadata, adapter_name)
        loaded = adapted_modules(pipe, adapter_name)
        count = sum(len(paths) for paths in loaded.values())
        if count == 0:
            models = " or ".join(kind for kind, _ in _models(pipe))
            raise ValueError(f"`path_or_folder`: {path or 'the state dict'} adapts no layer of this model "
                             f"(its {len(names)} modules, e.g. {names[:3]}, match none of the {models}'s); is it "
                             "a LoRA for another architecture?")
    except Exception as error:
        _take_out(pipe, adapter_name, snapshots)
        raise _failure(error, path) from None
    unused = unused_modules(names, loaded, pipe.unet.config.layers_per_block)
    if unused:
        warnings.warn(f"LoRA {adapter_name!r}: {len(unused)} of its {len(names)} modules adapt nothing in this "
                      f"model and were not used: {', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}",
                      stacklevel=3)
    lora = Lora(adapter_name, scale, path, sha, count)
    pipe.loras[adapter_name] = lora
    _apply(pipe, [*pipe.active_loras, adapter_name], {name: entry.scale for name, entry in pipe.loras.items()})
    return lora


def _apply(pipe, active: list[str], scales: dict[str, float]) -> None:
    """Make `active` the acting adapters with their scales, on every peft layer; clear the embedding cache."""
    for _, model in _models(pipe):
        for _, layer in _tuner_layers(model):
            present = [name for name in active if name in layer.lora_A]
            layer.set_adapter(present)  # peft turns gradients on for active adapters: we only infer
            for name in present:
                layer.set_scale(name, scales[name])
                for parameter in (*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters()):
                    parameter.requires_grad_(False)
    pipe.active_loras = list(active)
    pipe.clear_embedding_caches()


def set_adapters(pipe, names, weights=None) -> None:
    """Activate `names` (a name or a list) with `weights` (a number or one per name; default: their scales)."""
    names = [names] if isinstance(names, str) else list(names) if isinstance(names, (list, tuple)) else names
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"`adapter_names`: got {names!r}; expected a name or a list of names")
    unknown = [n for n in names if n not in pipe.loras]
    if unknown:
        raise ValueError(f"`adapter_names`: {unknown} not loaded; loaded: {list(pipe.loras)}")
    if weights is None:
        weights = [pipe.loras[n].scale for n in names]
    elif not isinstance(weights, (list, tuple)):
        weights = [weights] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"`adapter_weights`: got {len(weights)} weights for {len(names)} adapters")
    weights = [check_scale("adapter_weights", w) for w in weights]
    if any(lora.fused for lora in pipe.loras.values()):
        raise ValueError("`adapter_names`: adapters are fused into the weights; unfuse_lora() first")
    for name, weight in zip(names, weights):
        pipe.loras[name].scale = weight
    _apply(pipe, names, {n: pipe.loras[n].scale for n in pipe.loras})


def fuse(pipe, lora_scale: float = 1.0, adapter_names: list[str] | None = None) -> None:
    """Add the acting adapters' weight changes (times `lora_scale`) into the base weights."""
    lora_scale = check_scale("lora_scale", lora_scale)
    if not pipe.loras:
        raise ValueError("fuse_lora: no LoRA is loaded")
    if any(lora.fused for lora in pipe.loras.values()):
        raise ValueError("fuse_lora: already fused; unfuse_lora() first")
    names = list(pipe.active_loras if adapter_names is None else adapter_names)
    unknown = [n for n in names if n not in pipe.loras]
    if unknown:
        raise ValueError(f"`adapter_names`: {unknown} not loaded; loaded: {list(pipe.loras)}")
    for _, model in _models(pipe):
        for _, layer in _tuner_layers(model):
            present = [n for n in names if n in layer.lora_A]
            if present:
                if lora_scale != 1.0:
                    layer.scale_layer(lora_scale)
                # unmerging subtracts what merging added, which is off by rounding: keep the exact
                # weights (on the CPU) so that unfuse_lora gives back the same model and model hash
                layer.ldm_unfused = [t.detach().to("cpu", copy=True) for t in layer.get_base_layer().parameters()]
                layer.merge(adapter_names=present)
                _changed(layer)
    for name in names:
        pipe.loras[name].fused = True
    pipe.fused_scale = lora_scale
    pipe.clear_embedding_caches()


def _changed(layer) -> None:
    """Count peft's merge or unmerge as a change of the base layer's tensors.

    peft adds the product in place through `.data`, which leaves each tensor's version counter (and
    its address) as it was: the fingerprints that the compiled-UNet cache, the prompt-embedding cache
    and the model hash check before every call would not see the new weights."""
    for tensor in (*layer.get_base_layer().parameters(), *layer.get_base_layer().buffers()):
        torch.autograd.graph.increment_version(tensor)


def unfuse(pipe) -> None:
    """Take fused adapters back out of the base weights (they act again unfused, at their scales)."""
    for _, model in _models(pipe):
        for _, layer in _tuner_layers(model):
            if layer.merged:
                layer.unmerge()
                saved = layer.__dict__.pop("ldm_unfused", None)
                if saved is not None:
                    with torch.no_grad():
                        for tensor, original in zip(layer.get_base_layer().parameters(), saved):
                            tensor.copy_(original)
                _changed(layer)
    for lora in pipe.loras.values():
        lora.fused = False
    pipe.fused_scale = 1.0
    _apply(pipe, pipe.active_loras, {name: lora.scale for name, lora in pipe.loras.items()})  # undoes lora_scale


def unload(pipe) -> None:
    """Remove every LoRA layer. Fused changes stay in the weights (unfuse first to drop them)."""
    from diffusers.utils import recurse_remove_peft_layers

    for _, model in _models(pipe):
        recurse_remove_peft_layers(model)
        for attribute in _PEFT_ATTRIBUTES:
            model.__dict__.pop(attribute, None)
    pipe.loras.clear()
    pipe.active_loras = []
    pipe.fused_scale = 1.0
    pipe.clear_embedding_caches()


def unfused(pipe) -> bool:
    """Whether LoRA layers act on the UNet outside its base weights (compiled packages cannot hold them)."""
    return any(not pipe.loras[name].fused and pipe.loras[name].scale != 0 for name in pipe.active_loras)


def recipe_of(pipe) -> dict:
    """The `Recipe` field for the adapters acting now (none: {})."""
    acting = [pipe.loras[name] for name in pipe.active_loras]
    if not acting:
        return {}
    return {"loras": [{"name": l.name, "scale": l.scale * (pipe.fused_scale if l.fused else 1.0), "sha256": l.sha256,
                       "fused": l.fused} for l in acting]}


class AdapterMethods:
    """The pipeline's LoRA methods (diffusers' names); the work is in this module's functions."""

    loras: dict[str, Lora]
    active_loras: list[str]

    def load_lora_weights(self, path_or_folder, adapter_name: str | None = None, scale: float = 1.0,
                          weight_name: str | None = None, allow_pickle: bool = False):
        """Load a LoRA (diffusers or kohya keys; a file, a folder or a state dict) onto the UNet and
        text encoder(s); it acts at `scale` together with those loaded before. Returns self."""
        load(self, path_or_folder, adapter_name, scale, weight_name, allow_pickle)
        return self

    def set_adapters(self, adapter_names, adapter_weights=None):
        """Only `adapter_names` act, at `adapter_weights` (one number, or one per name). Returns self."""
        set_adapters(self, adapter_names, adapter_weights)
        return self

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: list[str] | None = None):
        """Fold the acting adapters into the weights (faster calls; `compile()` works again). Returns self."""
        fuse(self, lora_scale, adapter_names)
        return self

    def unfuse_lora(self):
        """Undo `fuse_lora`: the exact weights from before it come back. Returns self."""
        unfuse(self)
        return self

    def unload_lora_weights(self):
        """Remove every LoRA. Returns self."""
        unload(self)
        return self

    def get_active_adapters(self) -> list[str]:
        return list(self.active_loras)

    def lora_info(self) -> list[dict]:
        """Every loaded adapter: name, scale, file, SHA-256, layers adapted, fused."""
        return [asdict(lora) for lora in self.loras.values()]

"""The fast path: the UNet compiled ahead of time with torch.export + AOTInductor, cached on disk.

Why ahead of time, and not only `torch.compile`: on the bundled model the UNet's time goes to
per-operator overhead (a 4 M-parameter network on 16x16 latents), which inductor removes. It
is fastest with `freezing` (weights baked in as constants, convolution weights pre-packed for
oneDNN), but freezing bypasses inductor's on-disk caches, so every new process would compile
again for over a minute. An AOTInductor package (`.pt2`: a shared library plus the weights)
is built once per model, shape, dtype, device, CPU and torch version, and loads in under a
second in later processes. `torch.compile` in the process stays available (`mode=` other than
"aot"): on CUDA, "reduce-overhead" adds CUDA graphs.

A package is named by a digest of everything that changes its code or its baked-in weights
(see `package_key`). Before every pipeline call the runner checks that the UNet's weights,
device and dtype are still those the package was built from (a cheap check of every
parameter's storage and version counter) and builds or loads another package when not, so a
compiled pipeline is never left drawing with stale weights.

The package takes the text's cross-attention keys and values as inputs where the UNet's
cross-attention is of the plain kind (every Stable Diffusion UNet), and the runner computes them
once per call (`text_keys`): the same for every step, they were a tenth of the bundled UNet's work.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import torch

from ..provenance.hashes import hash_state, weights_state
from ..files import atomic_path
from ..text.keys import GivenText, cross_attentions, keys_values, text_attentions

FORMAT = 3  # bump when the way packages are built changes, so that old ones are not reused
MODES = ("aot", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def cache_root(cache_dir: str | os.PathLike | None = None, kind: str = "compiled") -> Path:
    """Where cached artefacts of a kind live ("compiled" packages, "previews" maps): `cache_dir`, else
    `$LDM_CACHE_DIR/<kind>`, else `~/.cache/ldm_pipeline/<kind>`."""
    if cache_dir is not None:
        return Path(cache_dir)
    root = os.environ.get("LDM_CACHE_DIR") or Path.home() / ".cache" / "ldm_pipeline"
    return Path(root) / kind


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of every tensor of the module's state dict: names, dtypes, shapes and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    hash_state(digest, module.state_dict(), as_fp32=False)
    return digest.hexdigest()


def package_key(unet, digest: str, sample_shape: tuple, context_shape: tuple, batch: int,
                added: tuple | None = None, keys: bool | None = None) -> str:
    """The name of the package for this UNet and these inputs.

    Args:
        digest: `weights_digest(unet)`.
        sample_shape: (C, h, w) of the latents; context_shape: (L, D) of the text embeddings.
        batch: the UNet's batch size (twice the images with classifier-free guidance).
        added: SDXL: (P, T), the widths of the pooled text embeds and time ids the UNet also takes.
        keys: whether the package takes the text's keys and values (`text_attentions`; None: find out).
    """
    keys = text_attentions(unet) is not None if keys is None else keys
    # diffusers' private config entries ("_use_default_values", "_name_or_path") say nothing of the
    # network, and one of them is a list in set order, which changes from process to process.
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_") or k == "_class_name"}
    weight = next(unet.parameters())  # diffusers' `unet.dtype` and `unet.device` walk every module
    parts = dict(format=FORMAT, weights=digest, config=config, sample=list(sample_shape),
                 context=list(context_shape), text="keys" if keys else "context", batch=batch,
                 added=list(added) if added else None,
                 dtype=str(weight.dtype), device=weight.device.type,
                 torch=torch.__version__, cpu=torch.backends.cpu.get_cpu_capability())
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class _Positional(torch.nn.Module):
    """The UNet as `(sample, timestep, context[, text_embeds, time_ids]) -> noise`, the form torch.export takes."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context, *added):
        return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False,
                         added_cond_kwargs=added_conditions(added))[0]


def added_conditions(added: tuple) -> dict | None:
    """SDXL's `added_cond_kwargs` from the (text_embeds, time_ids) inputs of a package (none: None)."""
    return {"text_embeds": added[0], "time_ids": added[1]} if added else None


def build_package(unet, path: Path, sample_shape: tuple, context_shape: tuple, batch: int,
                  added: tuple | None = None) -> Path:
    """Export the UNet for these shapes and compile it with AOTInductor into `path` (atomically).

    Shapes are static: on the bundled model a package with a symbolic batch size ran at 18 ms
    per call against 10 ms for a fixed one, so each batch size gets its own package.
    """
    options = dict(device=unet.device, dtype=unet.dtype)
    sample, timestep = torch.randn(batch, *sample_shape, **options), torch.tensor(500.0, device=unet.device)
    context = torch.randn(batch, *context_shape, **options)
    extra = tuple(torch.randn(batch, width, **options) for width in added) if added else ()
    layers = text_attentions(unet)
    with torch.no_grad():
        if layers is None:
            exported = torch.export.export(_Positional(unet).eval(), (sample, timestep, context, *extra))
        else:
            given = GivenText(unet, layers, added=bool(added))
            try:
                exported = torch.export.export(given.eval(), (sample, timestep, *keys_values(layers, context),
                                                              *extra))
            finally:
                given.restore()
    with atomic_path(path) as partial:
        # Inductor freezes (folds weights in, pre-packs them for oneDNN) only with gradients off.
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(exported, package_path=str(partial),
                                                     inductor_configs={"freezing": True})
    return path


def flat_runner(package):
    """A loaded package's entry point without the per-call (un)flattening of its Python wrapper.

    The wrapper parses its input and output tree specs and walks them on every call, about a
    third of a millisecond, 2 % of the bundled UNet's call; the loader's own entry point takes
    the flat list of tensors.
    """
    loader = getattr(package, "loader", None)
    if loader is not None and hasattr(loader, "boxed_run"):
        return loader.boxed_run
    return lambda inputs: [package(*inputs)]


class AotUNet:
    """Calls like the UNet (`unet(sample, t, encoder_hidden_states=..., return_dict=False)`)
    but runs AOTInductor packages, built on first need and cached on disk.

    Made by `CompiledUNet.runner_for`, once per pipeline call, after the weights were checked.
    """

    def __init__(self, owner: "CompiledUNet", unet, sample_shape: tuple, context_shape: tuple,
                 added: tuple | None = None):
        self.owner, self.unet, self.added = owner, unet, added
        self.sample_shape, self.context_shape = tuple(sample_shape), tuple(context_shape)
        self._runs = {}  # batch -> package; the key is worth computing once per call, not per step
        self.layers = owner.text_layers(unet)  # None: the packages take the context itself
        self._text = None  # (context, its version, its keys and values): the same tensor at every step

    def __call__(self, sample, timestep, encoder_hidden_states=None, return_dict=False, added_cond_kwargs=None,
                 **kwargs):
        # Extra UNet inputs are not what was compiled; a package that could not be built is None.
        extra = any(value is not None for value in kwargs.values()) or (added_cond_kwargs is None) != (not self.added)
        run = None if extra else self._package(sample.shape[0])
        if run is None:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             return_dict=return_dict, added_cond_kwargs=added_cond_kwargs, **kwargs)
        # The UNet casts the timestep to float32 for its embedding; casting here is the same number.
        t = torch.as_tensor(timestep, device=sample.device).to(torch.float32).reshape(())
        added = [added_cond_kwargs["text_embeds"].contiguous(), added_cond_kwargs["time_ids"].contiguous()] \
            if self.added else []
        return (run([sample.contiguous(), t, *self._text_inputs(encoder_hidden_states), *added])[0],)

    def _text_inputs(self, context) -> list:
        """The package's text inputs: the context, or its keys and values, computed on the first step."""
        if self.layers is None:
            return [context.contiguous()]
        if self._text is None or self._text[0] is not context or self._text[1] != context._version:
            self._text = (context, context._version, keys_values(self.layers, context))
        return self._text[2]

    def _package(self, batch: int):
        """The package's flat entry point (a list of input tensors -> a list of outputs), or None."""
        if batch not in self._runs:
            package = self.owner.package(self.unet, self.sample_shape, self.context_shape, batch, fall_back=True,
                                         added=self.added)
            self._runs[batch] = None if package is None else flat_runner(package)
        return self._runs[batch]


class CompiledUNet:
    """The compiled state a pipeline holds after `pipe.compile()`.

    Args:
        mode: "aot" (AOTInductor packages reused across processes), or a `torch.compile` mode
            ("default", "reduce-overhead" for CUDA graphs, "max-autotune", ...) compiled in the process.
        cache_dir: where "aot" packages go (see `cache_root`).
        verbose: print a line when a package is built or loaded.
    """

    def __init__(self, mode: str = "aot", cache_dir: str | os.PathLike | None = None, verbose: bool = True):
        if mode not in MODES:
            raise ValueError(f"`mode`: got {mode!r}; expected one of {list(MODES)}")
        self.mode, self.cache_dir, self.verbose = mode, cache_root(cache_dir), verbose
        self._state = None  # weights_state of the UNet when `_digest` was taken
        self._digest = None
        self._packages: dict[str, object] = {}  # key -> loaded AOTInductor runner
        self._in_process = None  # (unet, torch.compile'd unet) for the other modes
        self._cross = None  # (weights_state, the UNet's cross-attention layers): one module walk per weights

    def runner_for(self, unet, sample_shape: tuple, context_shape: tuple, added: tuple | None = None):
        """A callable with the UNet's signature for latents (C, h, w) and contexts (L, D) (and, for SDXL,
        added conditions of widths `added`: (P, T)).

        Called before each pipeline call: it notices new weights, a new device or dtype.
        """
        if self.mode != "aot":
            if self._in_process is None or self._in_process[0] is not unet:
                self._in_process = (unet, torch.compile(unet, mode=self.mode, fullgraph=True))
            return self._in_process[1]
        self._refresh(unet)
        return AotUNet(self, unet, sample_shape, context_shape, added)

    def build(self, unet, sample_shape: tuple, context_shape: tuple, batch: int, added: tuple | None = None) -> None:
        """Load or build the package for these inputs now ("aot" mode), so the first call does not wait."""
        self._refresh(unet)
        self.package(unet, sample_shape, context_shape, batch, added=added)

    def text_layers(self, unet) -> list | None:
        """`text_attentions(unet)`, walking the modules again only when the weights' state changed (an
        adapter's layers add weights); the layers' processors are checked every time (a cheap look)."""
        if self._cross is None or self._cross[0] != self._state:
            self._cross = (self._state, cross_attentions(unet))
        return text_attentions(unet, self._cross[1])

    def _refresh(self, unet) -> None:
        """Digest the weights again when the cheap fingerprint says they changed."""
        state = weights_state(unet)
        if state != self._state:
            self._digest, self._state = weights_digest(unet), state

    def package(self, unet, sample_shape: tuple, context_shape: tuple, batch: int, fall_back: bool = False,
                added: tuple | None = None):
        """The loaded package for these inputs: from memory, from the disk cache, or built now.

        With `fall_back`, a package that cannot be built (no C++ compiler, a UNet that torch.export
        does not take, a full disk) gives a warning and None, once: the caller runs the UNet eagerly.
        """
        key = package_key(unet, self._digest, sample_shape, context_shape, batch, added,
                          self.text_layers(unet) is not None)  # 0.05 ms, once per call
        if key not in self._packages:
            try:
                self._packages[key] = self._load_or_build(unet, key, sample_shape, context_shape, batch, added)
            except Exception as error:
                if not fall_back:
                    raise
                warnings.warn(f"compiling the UNet for latents {sample_shape}, batch {batch} failed "
                              f"({type(error).__name__}: {error}); it runs eagerly", stacklevel=3)
                self._packages[key] = None
        return self._packages[key]

    def _load_or_build(self, unet, key: str, sample_shape: tuple, context_shape: tuple, batch: int,
                       added: tuple | None):
        path = self.cache_dir / f"unet-{key}.pt2"
        if not path.is_file():
            self._say(f"compiling the UNet for latents {sample_shape}, batch {batch} "
                      f"(once per model, shape and machine; about a minute for small models) into {path}")
            start = time.perf_counter()
            build_package(unet, path, sample_shape, context_shape, batch, added)
            self._say(f"compiled in {time.perf_counter() - start:.0f} s")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch._inductor.aoti_load_package(str(path))

    def _say(self, message: str) -> None:
        if self.verbose:
            print(f"ldm_pipeline: {message}", flush=True)


def default_mode(device: torch.device) -> str:
    """"aot" on the CPU; "reduce-overhead" (CUDA graphs) on a GPU, where an AOTInductor package of the
    SD 1.5 UNet crashed the process on loading (torch 2.11, CUDA 13, H100) and CUDA graphs gave 4x."""
    return "aot" if torch.device(device).type == "cpu" else "reduce-overhead"


def compile_unet(unet, mode: str, cache_dir, verbose: bool, batch: int | None, height: int | None,
                 width: int | None, factor: int, text_length: int, added: tuple | None = None) -> "CompiledUNet":
    """`LatentDiffusionPipeline.compile`'s work: a `CompiledUNet`, with the "aot" package for
    (height, width, batch) built now unless `batch` is None (the model's own size by default)."""
    compiled = CompiledUNet(mode, cache_dir, verbose)
    if mode == "aot" and batch is not None:
        side = unet.config.sample_size
        size = (unet.config.in_channels, height // factor if height else side, width // factor if width else side)
        compiled.build(unet, size, (text_length, unet.config.cross_attention_dim), batch, added)
    return compiled

"""`ldm generate`: prompts, image-to-image, inpainting and outpainting, prompt files, drawing again from a PNG.

Its call settings come from `GenerationSettings` (their flags are made in `cli._setting_flags`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..loading.folders import is_hub_id
from ..output import steps_text
from ..settings import fields_of, meta


def _setting_arguments(args: argparse.Namespace) -> dict:
    """The call settings given by flags, as `pipe(...)` keyword arguments: a repeated flag given once is one
    value (for every ControlNet), one not given is left to the pipeline's default."""
    arguments = {}
    for f in fields_of(flag=True):
        value = getattr(args, f.name)
        if meta(f.name).flag_options.get("action") == "append":
            if value is None:
                continue
            value = value[0] if len(value) == 1 else value
        arguments[f.name] = value
    return arguments


# what --from takes from the recipe instead: the setting flags and these (with their defaults, to notice them given)
_RECIPE_OPTIONS = {"prompt": ("prompt", []), "size": ("--size", None), "scheduler": ("--scheduler", None),
                   "region": ("--region", []), "outpaint": ("--outpaint", None), "fast": ("--fast", None)}


def _given_with_recipe(args: argparse.Namespace) -> list[str]:
    """The flags given that --from cannot take, since the recipe gives those settings."""
    options = {f.name: (meta(f.name).flag, None if meta(f.name).flag_options.get("action") == "append" else f.default)
               for f in fields_of(flag=True)  # the recipe names these files (and nets); they may be given
               if f.name not in ("image", "mask_image", "controlnet", "control_image")}
    options.update(_RECIPE_OPTIONS)
    return [flag for name, (flag, default) in options.items() if getattr(args, name) != default]


def _lora_spec(spec: str) -> tuple[str, float]:
    """`PATH` or `PATH:SCALE` -> (path, scale); checked before a model loads."""
    path, _, scale = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "1")
    try:
        value = float(scale)
    except ValueError:
        raise ValueError(f"--lora: got {spec!r}; expected PATH or PATH:SCALE with a number SCALE") from None
    if not Path(path).exists():
        raise ValueError(f"--lora: {path!r} does not exist (expected a LoRA .safetensors file or folder)")
    return path, value


def _prompt_jobs(args: argparse.Namespace):
    from .prompt_files import read_prompt_file

    clashes = [flag for flag, given in (("prompt", bool(args.prompt)), ("--from", args.source is not None),
                                        ("--image", args.image is not None), ("--num-images", args.num_images_per_prompt != 1),
                                        ("--region", bool(args.region))) if given]
    if clashes:
        raise ValueError(f"--prompts: the prompt file gives the prompts, an image each; drop {', '.join(clashes)}")
    if args.out.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") or args.out.is_file():
        raise ValueError(f"--out: got {str(args.out)!r}; with --prompts it is a folder to render into")
    return read_prompt_file(args.prompts, base_seed=args.seed or 0, steps=args.num_inference_steps,
                            negative_prompt=args.negative_prompt, prompt_composition=args.prompt_composition)


def generate(args: argparse.Namespace) -> None:
    import torch

    from .. import LatentDiffusionPipeline, make_grid
    from ..pipeline import default_dtype
    from ..sampling.previews import save_strip
    from ..provenance.png import read_recipes, write_png

    for spec in args.lora:
        _lora_spec(spec)  # before a model loads
    if args.fast and not Path(args.fast).exists() and not is_hub_id(args.fast):
        raise ValueError(f"--fast: {args.fast!r} is neither a LoRA file or folder nor a Hub id (owner/name); give "
                         "an LCM-LoRA, or --fast alone for the model's own")
    if args.prompts is not None:
        jobs = _prompt_jobs(args)  # the whole file is checked before a model loads
    elif args.out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"--out: got {str(args.out)!r}; expected a .png, .jpg or .webp file name")
    if args.source is not None:
        given = _given_with_recipe(args)
        if given:
            raise ValueError(f"--from: the recipe gives the settings; drop {', '.join(given)}")
        recipes, grid = read_recipes(args.source)  # before loading a model: a PNG without a recipe fails fast
        rows = grid[0] if grid else 1
    elif not args.prompt and args.prompts is None:
        raise ValueError("prompt: give one or more prompts, or --from PNG to draw an image again")
    elif args.ignore_model_hash:
        raise ValueError("--ignore-model-hash: applies only with --from")
    if args.outpaint is not None and (args.image is None or args.mask_image is not None):
        raise ValueError("--outpaint: extends --image and makes the mask itself; give --image and no --mask")
    if args.preview is not None and (args.prompts is not None or args.source is not None):
        raise ValueError("--preview: applies to prompts given on the command line, not with --prompts or --from")
    if args.preview is not None and args.preview.suffix.lower() != ".png":
        raise ValueError(f"--preview: got {str(args.preview)!r}; expected a .png file name")
    if args.prompts is not None and args.device == "cuda":
        from accelerate import PartialState

        args.device = str(PartialState().device)  # under accelerate launch: this process's own GPU
    offload = args.low_memory and torch.device(args.device).type != "cpu"
    if offload and args.compile:
        raise ValueError("--compile: cannot be combined with --low-memory on a GPU (model offload moves the UNet "
                         "that the compiled package holds); drop one of them")
    if offload:  # loaded in the GPU's dtype into CPU memory; each model goes to the GPU only while it runs
        pipe = LatentDiffusionPipeline.from_pretrained(args.model, torch_dtype=default_dtype(args.device))
        pipe.enable_model_cpu_offload(args.device)
    else:
        pipe = LatentDiffusionPipeline.from_pretrained(args.model, device=args.device)
    if args.low_memory:
        pipe.enable_attention_slicing().enable_vae_slicing()
    if args.low_memory or args.tile_vae:
        pipe.enable_vae_tiling()
    for spec in args.lora:
        path, scale = _lora_spec(spec)
        pipe.load_lora_weights(path, adapter_name=Path(path).stem.replace(".", "_"), scale=scale)
    if args.fast is not None:
        pipe.enable_fast(args.fast or None)
    if args.scheduler:  # after --fast: a scheduler named here wins
        pipe.set_scheduler(args.scheduler)
    if args.compile:
        pipe.compile(batch=None)  # built for the call's own size and batch when it runs
    if args.controlnet:  # the call takes the loaded nets, not their paths
        from ..loading.controlnet import load_controlnet

        pipe.controlnet = [load_controlnet(path, torch_dtype=pipe.dtype).to(pipe.device) for path in args.controlnet]
        args.controlnet = None
    if args.control_preprocess and args.control_image:  # saved, so that the recipe names the picture used
        from ..conditioning.preprocess import preprocess

        made = [args.out.with_name(f"{args.out.stem}-control{i}.png") for i in range(len(args.control_image))]
        for path, given in zip(made, args.control_image):
            preprocess(args.control_preprocess, given).save(path)
        args.control_image = [str(path) for path in made]
    if args.prompts is not None:
        from .prompt_files import render

        width, height = args.size or (None, None)
        written = render(pipe, jobs, args.out, guidance_scale=args.guidance_scale, height=height, width=width)
        print(f"wrote {len(written)} image(s) into {args.out} ({len(jobs)} in {args.prompts.name}; see manifest.jsonl)")
        return
    if args.source is not None:
        result = pipe.reproduce(recipes, image=args.image, mask_image=args.mask_image,
                                control_image=args.control_image, ignore_model_hash=args.ignore_model_hash)
    else:
        width, height = args.size or (None, None)
        frames = []  # the live previews, for --preview
        arguments = {**_setting_arguments(args), "prompt": args.prompt}
        if args.outpaint is not None:
            from ..masks import outpaint

            arguments["image"], arguments["mask_image"] = outpaint(args.image, *args.outpaint,
                                                                   multiple=pipe.vae_scale_factor)
        result = pipe(**arguments, height=height, width=width,
                      regions=[args.region] * len(args.prompt) if args.region else None,
                      preview=frames.append if args.preview else None)
        rows = len(args.prompt)
        if args.preview:
            print(f"wrote {save_strip(frames, args.preview)} ({len(frames)} previews)")
    single = len(result.images) == 1
    picture = result.images[0] if single else make_grid(result.images, rows=rows)
    if args.out.suffix.lower() == ".png":
        cols = -(-len(result.images) // rows)
        write_png(picture, args.out, result.recipes(), grid=None if single else (rows, cols))
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        picture.save(args.out)
        print(f"note: {args.out.suffix} files carry no recipe; write a .png to keep one")
    print(f"wrote {args.out} ({result.width}x{result.height}, seeds {result.seeds}, {steps_text(result.steps_run)}, "
          f"{result.scheduler}, guidance {result.guidance_scale})")

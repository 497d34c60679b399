"""The `ldm` command. Thin: it parses arguments and calls the public API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..sampling.schedulers import SCHEDULERS
from ..settings import fields_of, meta
from .api_config import add_flags as api_flags, config_from_args as api_config_from
from .generate import generate as generate_command


def _fast_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fast", nargs="?", const="", default=None, metavar="LCM_LORA",
                        help="draw in a step or a few: fuse the model's LCM-LoRA (or this one: a folder, file or "
                             "Hub id) and take its scheduler, steps and guidance (pipe.enable_fast())")


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size: got {text!r}; expected WIDTHxHEIGHT such as 512x512") from None
    return width, height


def _setting_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for each call setting that has one (`settings.GenerationSettings`), its default the setting's."""
    for f in fields_of(flag=True):
        option = meta(f.name)
        repeated = option.flag_options.get("action") == "append"  # a list of what was given, None when nothing
        parser.add_argument(option.flag, dest=f.name, default=None if repeated else f.default, **option.flag_options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent diffusion: text-to-image and image-to-image.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="draw images for one or more prompts")
    generate.add_argument("prompt", nargs="*", help="one or more prompts; several make a grid, a row each")
    _setting_flags(generate)
    generate.add_argument("--size", type=_size, default=None, metavar="WxH")
    generate.add_argument("--model", default=None, help="model folder or Hub id (default: the bundled model)")
    generate.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None)
    generate.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (fp16 on CUDA)")
    generate.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                          help="load a LoRA (a .safetensors file or a folder; diffusers or kohya keys) at SCALE "
                               "(default 1); repeat for several")
    _fast_flag(generate)
    generate.add_argument("--region", action="append", default=[], type=_region, metavar="L,T,R,B",
                          help="with --prompt-composition: the box of the next AND part, as fractions of the image "
                               "(0,0,0.5,0.5 is the top left quarter; 'all' for the whole image); one per part")
    generate.add_argument("--control-preprocess", choices=("canny", "scribble"), default=None,
                          help="turn each --control-image into the picture its ControlNet takes first (Canny edges, "
                               "or a drawing's strokes), saved beside --out as OUT-control<i>.png")
    generate.add_argument("--outpaint", type=_margins, default=None, metavar="L,T,R,B",
                          help="extend --image by these pixels on the left, top, right and bottom and draw the new "
                               "area to continue the picture (outpainting)")
    generate.add_argument("--preview", type=Path, default=None, metavar="STRIP.png",
                          help="also write a strip of live previews (the predicted image every --preview-every "
                               "steps, a row per image) to this PNG")
    generate.add_argument("--compile", action="store_true",
                          help="run the UNet compiled (pipe.compile()): about twice as fast; the first run for a "
                               "model, size and batch compiles it (about a minute), later runs load it from the cache")
    generate.add_argument("--prompts", type=Path, default=None, metavar="FILE",
                          help="render a prompt file (a prompt per line, or JSON lines with prompt, seed, "
                               "negative_prompt, steps, prompt_composition, regions, image, strength, mask) into the "
                               "folder --out, "
                               "resumably; under accelerate launch the prompts are split across processes. --seed, "
                               "--steps, --negative-prompt and --prompt-composition are the defaults for lines that "
                               "do not say (a line's seed: --seed plus its number)")
    generate.add_argument("--low-memory", action="store_true",
                          help="for small GPUs: attention and VAE slicing, VAE tiling and, on a GPU, model CPU "
                               "offload (each model on the GPU only while it runs); same pixels but for tiling")
    generate.add_argument("--tile-vae", action="store_true",
                          help="decode (and, for --image, encode) images larger than 512 px in blended tiles")
    generate.add_argument("--from", dest="source", type=Path, default=None, metavar="PNG",
                          help="draw again the image (or grid) whose recipe this PNG carries, instead of prompts")
    generate.add_argument("--ignore-model-hash", action="store_true",
                          help="with --from: draw even if the model's hash differs from the recipe's")
    generate.add_argument("--out", required=True, type=Path,
                          help="output PNG, carrying its recipe (a grid for several images, with every recipe)")

    shapes = commands.add_parser("shapes-data", help="render shapes scenes with a new shape into a captioned "
                                                     "image folder (metadata.jsonl), for LoRA training")
    shapes.add_argument("shape", help="the new shape to teach (star)")
    shapes.add_argument("--n", type=int, default=1000, help="scenes with the new shape (default 1000)")
    shapes.add_argument("--mix", type=int, default=500,
                        help="ordinary training scenes mixed in, so old prompts keep working (default 500)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--out", required=True, type=Path, help="the folder to write")

    train = commands.add_parser("train", help="train one stage from its config, or a whole training plan")
    train.add_argument("what", help="a stage config (configs/shapes/unet.json) or a training plan folder (configs/shapes)")
    train.add_argument("--run-dir", type=Path, default=Path("runs/shapes"),
                       help="where checkpoints, logs and loss plots go (default: runs/shapes)")
    train.add_argument("--out", type=Path, default=None,
                       help="for a plan: where the assembled model goes (default: RUN_DIR/model)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoints")
    train.add_argument("--steps", type=int, default=None, help="override the stage's number of steps")
    train.add_argument("--batch-size", type=int, default=None, help="override the stage's global batch size")
    train.add_argument("--data", default=None, help="override the stage's data: \"shapes\" or a folder with "
                                                    "metadata.jsonl (a LoRA stage needs one)")

    evaluate = commands.add_parser("eval", help="score a model: prompt accuracy, CLIP score and FID")
    evaluate.add_argument("--model", default=None, help="model folder or Hub id (default: the bundled model)")
    evaluate.add_argument("--prompts", default="shapes",
                          help="'shapes' (seen, held-out and two-object prompts, judged) or a text file, a prompt per line")
    evaluate.add_argument("--n", type=int, default=100, help="images per prompt set (default 100)")
    evaluate.add_argument("--seeds", default="0", help="image i's seed: a first seed (0), a range (0-99) or a list (1,5,9)")
    evaluate.add_argument("--prompt-seed", type=int, default=0, help="selects the shapes prompts")
    evaluate.add_argument("--kinds", nargs="+", default=None,
                          help="shapes prompt kinds: seen held_out two three (default: all)")
    evaluate.add_argument("--steps", type=int, default=None)
    evaluate.add_argument("--guidance", type=float, default=None)
    evaluate.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None)
    _fast_flag(evaluate)
    evaluate.add_argument("--clip", default=None, help="CLIPModel folder or Hub id (default: the bundled shapes CLIP)")
    evaluate.add_argument("--features", choices=("clip", "inception"), default="clip", help="FID features")
    evaluate.add_argument("--inception", default=None, help="Inception-v3 TorchScript file for --features inception")
    evaluate.add_argument("--real", default=None,
                          help="folder of real images for FID (default for shapes: renders; none for a prompt file)")
    evaluate.add_argument("--exclude-training", type=int, default=20_000,
                          help="shapes: leave out captions of this many training items (the UNet's cache size)")
    evaluate.add_argument("--sweep", action="store_true", help="vary steps, scheduler and guidance; plot the trade-off")
    evaluate.add_argument("--sweep-steps", type=int, nargs="+", default=None)
    evaluate.add_argument("--sweep-schedulers", nargs="+", choices=sorted(SCHEDULERS), default=None)
    evaluate.add_argument("--sweep-guidance", type=float, nargs="+", default=None)
    evaluate.add_argument("--clip-guidance", type=float, default=0.0,
                          help="CLIP guidance scale (steers with the --clip CLIP; default 0: off)")
    evaluate.add_argument("--sweep-clip-guidance", type=float, nargs="+", default=None)
    evaluate.add_argument("--prompt-composition", action="store_true",
                          help="read AND as composed prompts; the shapes prompts of several objects are drawn "
                               "with their objects joined by AND (and judged as written)")
    evaluate.add_argument("--regions", action="store_true",
                          help="with --prompt-composition: keep each object's part of a shapes prompt to the box "
                               "of its position (a corner's quadrant, the middle for the center)")
    evaluate.add_argument("--batch-size", type=int, default=25)
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--cache-dir", default=None, help="where real-image FID statistics are cached")
    evaluate.add_argument("--out", required=True, type=Path,
                          help="JSON report; the Markdown table (.md) and pictures (.png) go beside it")

    paired = commands.add_parser("compare", help="two `ldm eval` reports of the same prompts, image by image")
    paired.add_argument("reports", nargs=2, type=Path, help="two JSON reports, A and B")

    serve = commands.add_parser("serve", help="serve a web page (Gradio) drawing with a model, and with --api "
                                              "AUTOMATIC1111's HTTP API; needs the [web] and [api] extras")
    serve.add_argument("--model", default=None, help="model folder or Hub id (default: the bundled model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (fp16 on CUDA)")
    serve.add_argument("--controlnet", default=None, metavar="PATH",
                       help="a ControlNet (diffusers folder, Hub id or original .safetensors file) for the page's "
                            "Control tab")
    api_flags(serve)
    return parser


def serve(args: argparse.Namespace) -> None:
    from .. import LatentDiffusionPipeline

    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port: got {args.port}; expected 1 to 65535")

    def load():
        pipe = LatentDiffusionPipeline.from_pretrained(args.model, device=args.device)
        if args.controlnet is not None:  # the page's Control tab draws with it
            from ..loading.controlnet import load_controlnet

            pipe.controlnet = load_controlnet(args.controlnet, torch_dtype=pipe.dtype).to(pipe.device)
        return pipe

    config = api_config_from(args, load)  # checked before any model loads
    host = "0.0.0.0" if args.listen else args.host
    try:
        if config is None or not args.nowebui:
            from .web import serve as serve_page
    except ImportError as error:
        raise ValueError(f"serve: the web page needs Gradio ({error}); pip install 'ldm-pipeline[web]'") from None
    if config is None:
        return serve_page(load(), host=host, port=args.port)
    try:
        from .api_serve import serve as serve_api
    except ImportError as error:
        raise ValueError(f"serve --api: needs FastAPI and uvicorn ({error}); pip install 'ldm-pipeline[api]'") from None
    if host != "127.0.0.1" and not config.auth:
        print(f"ldm: warning: the API listens on {host} without --api-auth: anyone who reaches it can use it",
              file=sys.stderr)
    serve_api(load(), host=host, port=args.port, config=config, webui=not args.nowebui)


def compare(args: argparse.Namespace) -> None:
    from ..evaluation import compare as paired
    print(paired.markdown(paired.compare(*map(paired.read_report, args.reports)), *map(str, args.reports)), end="")


def shapes_data(args: argparse.Namespace) -> None:
    from ..shapes import ShapesDataset, new_shape_scenes, write_image_folder

    if args.n < 1 or args.mix < 0:
        raise ValueError(f"--n/--mix: got {args.n}/{args.mix}; expected --n >= 1 and --mix >= 0")
    scenes = new_shape_scenes(args.shape, args.n, args.seed)
    old = ShapesDataset(args.mix, seed=args.seed + 1)
    count = write_image_folder(scenes + [old.scene(i) for i in range(args.mix)], args.out)
    print(f"wrote {count} images and metadata.jsonl into {args.out}")


def train(args: argparse.Namespace) -> None:
    from ..training.plan import run_plan, run_stage

    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("data", args.data))
                 if v is not None}
    target = Path(args.what)
    if target.is_dir():
        if overrides:
            raise ValueError("--steps/--batch-size/--data: apply to one stage; pass a stage config, not a plan folder")
        out = run_plan(target, args.run_dir, args.out or args.run_dir / "model", resume=args.resume)
        print(f"wrote the model to {out}")
    else:
        run_stage(target, args.run_dir, resume=args.resume, overrides=overrides)
        print(f"trained {target.stem} in {args.run_dir}")


def _region(text: str) -> tuple[float, ...] | None:
    """`L,T,R,B` (fractions of the image) or `all` -> a box for `regions=`; the pipeline checks the values."""
    from ..guidance.composition import parse_box

    try:
        return parse_box(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _margins(text: str) -> tuple[int, int, int, int]:
    """`L,T,R,B` pixels -> the margins of `masks.outpaint`."""
    try:
        left, top, right, bottom = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--outpaint: got {text!r}; expected L,T,R,B pixels such as 0,0,64,0") \
            from None
    return left, top, right, bottom


def evaluate(args: argparse.Namespace) -> None:
    import json

    from .. import LatentDiffusionPipeline, make_grid
    from ..evaluation import report as rep
    from ..evaluation.accuracy import KINDS, training_captions
    from ..evaluation.clip import Clip
    from ..evaluation.features import make_extractor

    # Every argument is checked before a model is loaded or an image drawn.
    if args.out.suffix.lower() != ".json":
        raise ValueError(f"--out: got {str(args.out)!r}; expected a .json file name")
    if args.n < 2:
        raise ValueError(f"--n: got {args.n}; expected at least 2 (FID needs a covariance)")
    seeds = rep.parse_seeds(args.seeds, args.n)
    kinds = tuple(args.kinds or KINDS)
    if set(kinds) - set(KINDS) or len(set(kinds)) < len(kinds):
        raise ValueError(f"--kinds: got {' '.join(args.kinds)!r}; expected some of {' '.join(KINDS)}, each once")
    if args.regions and (not args.prompt_composition or args.prompts != "shapes"):
        raise ValueError("--regions: applies to the shapes prompts with --prompt-composition (it boxes each "
                         "object's part by its position word)")
    prompt_file = rep.file_set(args.prompts, args.n) if args.prompts != "shapes" else None
    real_folder = rep.folder_images(args.real) if args.real else None
    clip = Clip.from_pretrained(args.clip, device=args.device)
    extractor = make_extractor(args.features, clip, args.inception, args.device)

    if prompt_file is not None:
        sets = [prompt_file]
    else:
        exclude = training_captions(args.exclude_training) if args.exclude_training else set()
        sets = rep.shapes_sets(args.n, args.prompt_seed, exclude, kinds, composed=args.prompt_composition,
                               regions=args.regions)
    if real_folder is not None:
        real = {sets[0].name if len(sets) == 1 else "all": real_folder}
    else:
        real = rep.shapes_reference(args.n, kinds) if prompt_file is None else {}
    references = rep.reference_stats(real, extractor, args.cache_dir)

    pipe = LatentDiffusionPipeline.from_pretrained(args.model, device=args.device)
    if args.fast is not None:
        pipe.enable_fast(args.fast or None)
    if args.scheduler:
        pipe.set_scheduler(args.scheduler)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    about = {"model": str(args.model or "bundled"), "prompts": args.prompts, "fast": args.fast is not None,
             "fast_lora": pipe.fast_mode.source if pipe.fast_mode is not None else None,
             "real": args.real or ("shapes renders" if real else None)}
    if args.sweep:
        axes = {"steps": args.sweep_steps or rep.SWEEP_STEPS, "schedulers": args.sweep_schedulers or rep.SWEEP_SCHEDULERS,
                "guidance": args.sweep_guidance or rep.SWEEP_GUIDANCE,
                "clip_guidance": args.sweep_clip_guidance or (args.clip_guidance,)}
        reports = [{**about, **r} for r in rep.sweep(pipe, sets, seeds, clip, extractor, references,
                                                    batch_size=args.batch_size,
                                                    prompt_composition=args.prompt_composition, **axes)]
        args.out.write_text(json.dumps(reports, indent=2))
        args.out.with_suffix(".md").write_text(rep.sweep_markdown(reports))
        rep.plot_sweep(reports, args.out.with_suffix(".png"))
        print(rep.sweep_markdown(reports))
    else:
        report = {**about, **rep.evaluate(pipe, sets, seeds, clip, extractor, references, args.batch_size,
                                          num_inference_steps=args.steps, guidance_scale=args.guidance,
                                          clip_guidance_scale=args.clip_guidance, clip_model=clip,
                                          prompt_composition=args.prompt_composition)}
        for name, images in report.pop("images").items():
            make_grid(images, cols=8).save(args.out.with_name(f"{args.out.stem}-{name}.png"))
        args.out.write_text(json.dumps(report, indent=2))
        args.out.with_suffix(".md").write_text(rep.markdown(report))
        print(rep.markdown(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"generate": generate_command, "train": train, "eval": evaluate, "compare": compare, "serve": serve,
         "shapes-data": shapes_data}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"ldm: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

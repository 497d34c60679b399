"""The `ldm` command. Thin: it parses arguments and calls the public API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .schedulers import SCHEDULERS


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size: got {text!r}; expected WIDTHxHEIGHT such as 512x512") from None
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent diffusion: text-to-image and image-to-image.")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="draw images for one or more prompts")
    generate.add_argument("prompt", nargs="+", help="one or more prompts; several make a grid, a row each")
    generate.add_argument("--negative-prompt", default=None)
    generate.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, else 50)")
    generate.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    generate.add_argument("--seed", type=int, default=None, help="image i uses seed+i (default: random)")
    generate.add_argument("--size", type=_size, default=None, metavar="WxH")
    generate.add_argument("--num-images", type=int, default=1, help="images per prompt; more than one makes a grid")
    generate.add_argument("--model", default=None, help="model folder or Hub id (default: the bundled model)")
    generate.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None)
    generate.add_argument("--image", default=None, help="reference picture for image-to-image")
    generate.add_argument("--strength", type=float, default=0.8, help="image-to-image strength in (0, 1]")
    generate.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (fp16 on CUDA)")
    generate.add_argument("--out", required=True, type=Path, help="output PNG (a grid for several images)")

    train = commands.add_parser("train", help="train one stage from its config, or a whole recipe")
    train.add_argument("what", help="a stage config (configs/shapes/unet.json) or a recipe folder (configs/shapes)")
    train.add_argument("--run-dir", type=Path, default=Path("runs/shapes"),
                       help="where checkpoints, logs and loss plots go (default: runs/shapes)")
    train.add_argument("--out", type=Path, default=None,
                       help="for a recipe: where the assembled model goes (default: RUN_DIR/model)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoints")
    train.add_argument("--steps", type=int, default=None, help="override the stage's number of steps")
    train.add_argument("--batch-size", type=int, default=None, help="override the stage's global batch size")
    return parser


def train(args: argparse.Namespace) -> None:
    from .training.recipe import run_recipe, run_stage

    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size)) if v is not None}
    target = Path(args.what)
    if target.is_dir():
        if overrides:
            raise ValueError("--steps/--batch-size: apply to one stage; pass a stage config, not a recipe folder")
        out = run_recipe(target, args.run_dir, args.out or args.run_dir / "model", resume=args.resume)
        print(f"wrote the model to {out}")
    else:
        run_stage(target, args.run_dir, resume=args.resume, overrides=overrides)
        print(f"trained {target.stem} in {args.run_dir}")


def generate(args: argparse.Namespace) -> None:
    from . import LatentDiffusionPipeline, make_grid

    if args.out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"--out: got {str(args.out)!r}; expected a .png, .jpg or .webp file name")
    width, height = args.size or (None, None)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model, device=args.device)
    if args.scheduler:
        pipe.set_scheduler(args.scheduler)
    result = pipe(args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, height=height, width=width, num_images_per_prompt=args.num_images,
                  seed=args.seed, image=args.image, strength=args.strength)
    picture = result.images[0] if len(result.images) == 1 else make_grid(result.images, rows=len(args.prompt))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(args.out)
    print(f"wrote {args.out} ({result.width}x{result.height}, seeds {result.seeds}, {result.steps_run} steps, "
          f"{result.scheduler}, guidance {result.guidance_scale})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        {"generate": generate, "train": train}[args.command](args)
    except (ValueError, TypeError) as error:
        print(f"ldm: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prompt accuracy on the shapes domain: draw images for prompts and let the judge read them.

    python -m ldm_pipeline.evaluation.accuracy --model ldm_pipeline/models/shapes --n 100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..training.shapes import ShapesDataset, caption, eval_prompts
from .judge import judge

KINDS = ("seen", "held_out", "two")


def training_captions(count: int, seed: int = 0) -> set[str]:
    """The captions of the first `count` training items (what a UNet trained on a cache of that size saw)."""
    dataset = ShapesDataset(count, seed=seed)
    return {caption(dataset.scene(i)) for i in range(count)}


def prompts_for(kind: str, n: int, seed: int = 0, exclude: set[str] = frozenset()) -> list[str]:
    """`n` evaluation prompts of a kind, leaving out any caption in `exclude` (where any are left)."""
    pool = eval_prompts(kind, 20 * n, seed)
    fresh = [p for p in pool if p not in exclude]
    return (fresh if len(fresh) >= n else pool)[:n]


def prompt_accuracy(pipe, kinds=KINDS, n: int = 100, seed: int = 0, batch_size: int = 25,
                    exclude: set[str] = frozenset(), **call_kwargs) -> tuple[dict, dict]:
    """Judge `n` images per kind of prompt; image i of a kind is drawn with seed `seed + i`.

    Returns:
        `(summary, images)`: per kind, the fraction of images with every object right and
        nothing extra ("correct") and per attribute ("colour", "shape", "position"), plus "n"
        and "extra" (mean count of objects not asked for); and the images with their prompts.
    """
    summary, images = {}, {}
    for kind in kinds:
        prompts = prompts_for(kind, n, seed, exclude)
        verdicts, drawn = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            result = pipe(chunk, seed=seed + start, progress=False, **call_kwargs)
            for prompt, image in zip(chunk, result.images):
                verdicts.append(judge(image, prompt))
                drawn.append((prompt, image))
        summary[kind] = {"n": len(verdicts), **{key: float(np.mean([getattr(v, key) for v in verdicts]))
                                                 for key in ("correct", "colour", "shape", "position", "extra")}}
        images[kind] = drawn
    return summary, images


def main(argv: list[str] | None = None) -> None:
    from .. import LatentDiffusionPipeline, make_grid

    parser = argparse.ArgumentParser(description="Prompt accuracy of a shapes model, read by the judge.")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--n", type=int, default=100, help="prompts per kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--exclude-training", type=int, default=20_000,
                        help="leave out captions of this many training items (the UNet's cache size)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report; a grid PNG per kind goes beside it")
    args = parser.parse_args(argv)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    if args.scheduler:
        pipe.set_scheduler(args.scheduler)
    exclude = training_captions(args.exclude_training) if args.exclude_training else set()
    summary, images = prompt_accuracy(pipe, n=args.n, seed=args.seed, exclude=exclude,
                                      num_inference_steps=args.steps, guidance_scale=args.guidance)
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model or "bundled"), "seed": args.seed,
                                        "steps": args.steps, "guidance": args.guidance, "summary": summary},
                                       indent=2))
        for kind, drawn in images.items():
            make_grid([image for _, image in drawn[:32]], cols=8).save(args.out.with_name(f"{args.out.stem}-{kind}.png"))


if __name__ == "__main__":
    main()

"""Fit the bundled model's preview map on its own latents, and measure how close previews are to the VAE.

The map is fitted on the final latents and the predicted x_0 of every 5th step of one set of
prompts and seeds, and measured on another (different seeds, different prompts): PSNR, mean
absolute error (0-255) and per-channel correlation of the preview against the real decode, for
the final latents and for the mid-loop predicted x_0. The same figures are given for a map fitted
the way any other VAE gets one on first use (synthetic pictures encoded by the VAE).

    OMP_NUM_THREADS=1 python benchmarks/previews.py            # measure only (the shipped map)
    OMP_NUM_THREADS=1 python benchmarks/previews.py --fit      # refit models/shapes/preview.json first
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.sampling import previews
from ldm_pipeline.pipeline import DEFAULT_MODEL
from ldm_pipeline.sampling.probes import record_x0

COLOURS = ["red", "green", "blue", "yellow", "orange", "purple"]
SHAPES = ["circle", "square", "triangle"]
PLACES = ["in the top left", "in the top right", "in the center", "in the bottom left", "in the bottom right"]


def prompts(part: int) -> list[str]:
    """Every other (colour, shape, place) prompt: part 0 and part 1 share none; a few of two objects."""
    single = [f"a {c} {s} {p}" for c, s, p in itertools.product(COLOURS, SHAPES, PLACES)][part::2]
    double = [f"{a} and {b}" for a, b in zip(single[::7], single[3::7])]
    return single[::3] + double


def latents_of(pipe, texts: list[str], seed: int, steps: int, every: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(final latents, predicted x_0 of every `every`-th step) of the model's calls, float32 on the CPU."""
    finals, middles = [], []
    for start in range(0, len(texts), 8):
        with record_x0(pipe.unet, pipe.scheduler, pipe.defaults["guidance_scale"]) as record:
            out = pipe(texts[start:start + 8], seed=seed + start, num_inference_steps=steps, output_type="latent",
                       progress=False)
        finals.append(out.images.float().cpu())
        middles += [x0 for step, x0 in enumerate(record.x0) if step % every == every - 1 and step < steps - 1]
    return torch.cat(finals), torch.cat(middles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fit", action="store_true", help="refit and write models/shapes/preview.json")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="docs/results/previews.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = LatentDiffusionPipeline.from_pretrained()
    shipped = DEFAULT_MODEL / "preview.json"
    if args.fit:
        final, middle = latents_of(pipe, prompts(0), seed=0, steps=args.steps)
        fitted = previews.fit(pipe.vae, torch.cat([final, middle]),
                              fitted_on=f"the bundled model's final and mid-loop predicted x_0 latents: "
                                        f"{len(final)} images, {args.steps} DDIM steps, x_0 of every 5th step")
        fitted.save(shipped)
        print(f"wrote {shipped}")
    own = previews.load(shipped)
    if own is None or own.fingerprint != previews.fingerprint(pipe.vae):
        raise SystemExit(f"{shipped} is missing or fitted to other VAE weights; run with --fit")
    synthetic = previews.fit(pipe.vae)
    final, middle = latents_of(pipe, prompts(1), seed=1000, steps=args.steps)
    report = dict(held_out=dict(prompts=len(prompts(1)), images=len(final), mid_loop_x0=len(middle), steps=args.steps))
    for name, preview in (("shipped (own latents)", own), ("first use (synthetic pictures)", synthetic)):
        report[name] = dict(final=previews.fidelity(preview, pipe.vae, final),
                            mid_loop_x0=previews.fidelity(preview, pipe.vae, middle))
        print(name, json.dumps(report[name]))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

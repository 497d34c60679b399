"""How crisp the small shapes of a fast LoRA's one-step images are, on the two-object prompts of `ldm eval`.

The strict measure passes a shape when its fit to the asked ideal shape beats every other shape's by
a margin of 0.10; the one-step misses are small shapes just under it. This prints, per LoRA (and for
the model's stored default, the distillation's teacher, with `--teacher`), the strict rate and the
mean and 10th percentile of that margin over the small objects (half-size under 7.5 px): a finer
reading than the pass rate, which moves by whole images.

    python benchmarks/one_step_margins.py LORA [LORA ...] [--prompt-seed 1] [--n 200] [--teacher]

The prompts and seeds are `ldm eval --n N --prompt-seed S --kinds two`'s, so the strict rate equals
that report's.
"""

from __future__ import annotations

import argparse

import numpy as np

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.evaluation import report as rep
from ldm_pipeline.evaluation.accuracy import training_captions
from ldm_pipeline.evaluation.strict import strict_judge

SMALL = 7.5  # half-size in pixels under which an object counts as small (small objects are ~6)


def margins(images, prompts) -> tuple[float, list[float]]:
    verdicts = [strict_judge(image, prompt) for image, prompt in zip(images, prompts)]
    small = [fit.margin for verdict in verdicts for fit in verdict.fits if fit and fit.half_size < SMALL]
    return sum(v.correct for v in verdicts) / len(verdicts), small


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loras", nargs="*", help="fast LoRA folders (default: the bundled one)")
    parser.add_argument("--prompt-seed", type=int, default=1)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--teacher", action="store_true", help="also the model's stored default")
    args = parser.parse_args()
    prompts = rep.shapes_sets(args.n, args.prompt_seed, training_captions(20_000), ["two"])[0].prompts
    seeds = list(range(args.n))
    runs = [("teacher (stored default)", "teacher")] if args.teacher else []
    if args.loras or not args.teacher:
        runs += [(lora or "bundled fast LoRA", lora) for lora in args.loras or [None]]
    for name, lora in runs:
        pipe = LatentDiffusionPipeline.from_pretrained()
        if lora == "teacher":
            images = rep.draw(pipe, prompts, seeds)[0]
        else:
            pipe.enable_fast(lora)
            images = rep.draw(pipe, prompts, seeds, num_inference_steps=1, guidance_scale=1.0)[0]
        rate, small = margins(images, prompts)
        print(f"{name}: strict {100 * rate:.1f} %, small-object margin mean "
              f"{np.mean(small):.4f}, 10th percentile {np.percentile(small, 10):.3f} ({len(small)} objects; "
              f"prompt seed {args.prompt_seed}, n {args.n})", flush=True)


if __name__ == "__main__":
    main()

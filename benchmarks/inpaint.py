"""Inpainting: what it costs next to image-to-image, and how well the bundled model fills a hole.

Two parts, each runnable alone (`--part speed`, `--part quality`):

- speed: SD 1.5's shapes with random weights (configs/sd15) at 256x256 on the CPU. An inpaint call
  (a 4-channel UNet, the bottom right quarter masked) and an image-to-image call of the same
  strength take turns in one process on shared components, after one warm-up call each, and the
  median and best seconds per call and their ratio are recorded; the same for a 9-channel
  inpainting UNet (SD 1.5's UNet config with `in_channels=9`, random weights). The issue's target:
  an inpaint call costs at most 1.1x an image-to-image call. Results go to docs/benchmarks/inpaint.json.
- quality: the bundled model (`LatentDiffusionPipeline.from_pretrained()`, its own 50 DDIM steps and
  guidance 2.5), two tasks, each case with its own fixed seed:
  1. add an object: a one-object scene is rendered, the empty quadrant of a second object is masked,
     and the caption of the two-object scene is the prompt (strength 1.0, `mask_blur` 4). The whole
     picture is judged (`evaluation.judge`, and the strict measure); every pixel outside the mask and
     its blur band is compared with the picture. The scenes are `ldm eval`'s "two" kind (training
     colour/shape pairs, captions not among the training items'); a second set asks for held-out
     pairs as the new object; and the same prompts and seeds drawn from noise (text to image) are
     judged alongside, as the model's accuracy without a picture to keep.
  2. extend a scene: a one-object picture in a left corner is widened with `masks.outpaint(picture,
     right=32)` (64x64 -> 96x64) and the prompt names a new object in a right corner; reported: the
     largest change of the original 64x64 part (outside the band: must be 0; and anywhere) and the
     judge's verdict. A smaller set widens by 64 (to 128x64), twice the side the model was trained on.
  Results go to docs/results/inpaint-bundled.json and .md, a grid to docs/figures/inpaint-examples.png.

    OMP_NUM_THREADS=1 python benchmarks/inpaint.py --clock process      # both parts (about 20 min, one thread)
    OMP_NUM_THREADS=1 python benchmarks/inpaint.py --part speed --repeats 5 --clock process
    OMP_NUM_THREADS=1 python benchmarks/inpaint.py --part quality --n 120 --outpaint-n 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import CLOCKS, PROMPT_SD, timed

SPEED_OUT = ROOT / "docs" / "benchmarks" / "inpaint.json"
QUALITY_OUT = ROOT / "docs" / "results" / "inpaint-bundled.json"
FIGURE_OUT = ROOT / "docs" / "figures" / "inpaint-examples.png"


# ---------------------------------------------------------------------------------------------- speed

def smooth_picture(side: int) -> PIL.Image.Image:
    """A deterministic picture with broad colour areas and some waves, something like a photograph for the VAE."""
    y, x = np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side), indexing="ij")
    channels = np.stack([0.5 + 0.4 * x, 0.5 + 0.4 * y, 0.5 + 0.3 * np.sin(6 * x) * np.cos(4 * y)], axis=-1)
    return PIL.Image.fromarray(np.round(np.clip(channels, 0, 1) * 255).astype(np.uint8))


def quarter_mask(side: int) -> PIL.Image.Image:
    """White (repaint) over the bottom right quarter."""
    mask = PIL.Image.new("L", (side, side), 0)
    mask.paste(255, (side // 2, side // 2, side, side))
    return mask


def nine_channel_unet(unet):
    """A UNet of the same config with 9 input channels (latents, mask, masked picture), random weights."""
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    config["in_channels"] = 9
    torch.manual_seed(1)
    return UNet2DConditionModel.from_config(config).to(unet.dtype).eval()


def speed(size: int, steps: int, strength: float, repeats: int, clock: str, nine: bool) -> dict:
    from ldm_pipeline import LatentDiffusionPipeline
    from ldm_pipeline.loading.random_components import build_random
    from ldm_pipeline.masks import soft

    torch.set_grad_enabled(False)
    components = build_random("sd15")
    four = LatentDiffusionPipeline(**components)
    picture, mask = smooth_picture(size), quarter_mask(size)
    common = dict(image=picture, strength=strength, num_inference_steps=steps, guidance_scale=7.5, seed=0,
                  progress=False)
    runs = {"image_to_image": lambda: four(PROMPT_SD, **common).images,
            "inpaint": lambda: four(PROMPT_SD, mask_image=mask, **common).images}
    if nine:
        inpainting = LatentDiffusionPipeline(**{**components, "unet": nine_channel_unet(components["unet"])})
        runs["inpaint_9_channels"] = lambda: inpainting(PROMPT_SD, mask_image=mask, **common).images
    device = torch.device("cpu")
    outputs = {key: run() for key, run in runs.items()}  # also the warm-up
    keep = soft(mask, 4) == 0
    original = np.asarray(picture, dtype=np.int16)
    outside = {key: int(np.abs(np.asarray(outputs[key][0], dtype=np.int16) - original)[keep].max())
               for key in runs if key != "image_to_image"}
    times = {key: [] for key in runs}
    for repeat in range(repeats):
        for key, run in runs.items():
            times[key].append(timed(run, device, clock))
        print(f"repeat {repeat + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
              flush=True)
    median = {key: statistics.median(values) for key, values in times.items()}
    best = {key: min(values) for key, values in times.items()}
    base = "image_to_image"
    return dict(
        model="sd15 (random weights)", size=size, steps=steps, steps_run=int(steps * strength), strength=strength,
        guidance=7.5, mask="bottom right quarter", device="cpu", threads=torch.get_num_threads(), clock=clock,
        repeats=repeats, torch=torch.__version__, cpu_capability=torch.backends.cpu.get_cpu_capability(),
        seconds={key: [round(t, 3) for t in values] for key, values in times.items()},
        median_s={key: round(value, 3) for key, value in median.items()},
        best_s={key: round(value, 3) for key, value in best.items()},
        ratio_median={key: round(median[key] / median[base], 3) for key in runs if key != base},
        ratio_best={key: round(best[key] / best[base], 3) for key in runs if key != base},
        target_ratio=1.1,
        max_uint8_change_outside_band=outside,
    )


def speed_table(result: dict) -> str:
    lines = ["| call | median s | best s | median / image to image | best / image to image |",
             "|---|---:|---:|---:|---:|"]
    for key, median in result["median_s"].items():
        ratio = result["ratio_median"].get(key)
        best_ratio = result["ratio_best"].get(key)
        lines.append(f"| {key.replace('_', ' ')} | {median:.2f} | {result['best_s'][key]:.2f} | "
                     f"{'-' if ratio is None else f'{ratio:.3f}'} | {'-' if best_ratio is None else f'{best_ratio:.3f}'} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- quality

SIDE = 64


def quadrant_mask(position: str, side: int = SIDE) -> PIL.Image.Image:
    """White over the quadrant of a corner position word."""
    from ldm_pipeline.shapes import POSITION_BOXES

    left, top, right, bottom = (round(f * side) for f in POSITION_BOXES[position])
    mask = PIL.Image.new("L", (side, side), 0)
    mask.paste(255, (left, top, right, bottom))
    return mask


def changes(result: PIL.Image.Image, picture: PIL.Image.Image, mask: PIL.Image.Image, blur: int) -> dict:
    """The largest uint8 change outside the mask and its band (weight 0), and in the band outside the mask."""
    from ldm_pipeline.masks import soft

    height, width = picture.height, picture.width
    drawn = np.asarray(result, dtype=np.int16)[:height, :width]
    diff = np.abs(drawn - np.asarray(picture, dtype=np.int16)).max(axis=-1)
    weights = soft(mask, blur)[:height, :width]
    band = (weights > 0) & (np.asarray(mask)[:height, :width] < 128)
    return {"outside_band": int(diff[weights == 0].max()), "band": int(diff[band].max()) if band.any() else 0,
            "anywhere": int(diff.max())}


def _same(expected, found) -> bool:
    return (expected.colour, expected.shape, expected.position) == (found.colour, found.shape, found.position)


def judged(image, prompt: str) -> dict:
    """The judge's and the strict measure's verdicts, and which of the prompt's objects were found right."""
    from ldm_pipeline.evaluation.strict import strict_judge
    from ldm_pipeline.shapes import parse_caption

    verdict = strict_judge(image, prompt)
    expected = parse_caption(prompt)
    right = [False] * len(expected)
    for e, f in verdict.judge.pairs:
        right[e] = _same(expected[e], verdict.judge.found[f])
    return {"correct": bool(verdict.judge.correct), "strict": bool(verdict.correct), "objects_right": right,
            "extra": int(verdict.judge.extra),
            "found": [f"{o.colour} {o.shape} in the {o.position}" for o in verdict.judge.found]}


def add_object_cases(n: int, seed: int, held_out: bool) -> list[tuple]:
    """(kept object, new object) pairs from `ldm eval`'s two-object scenes; with `held_out`, the new object
    takes the held-out colour/shape pairs in turn (its place and geometry unchanged)."""
    from ldm_pipeline.evaluation.accuracy import scenes_for, training_captions
    from ldm_pipeline.shapes import HELD_OUT_PAIRS, ShapeObject

    scenes = scenes_for("two", n, seed, exclude=training_captions(20_000))
    pairs = sorted(HELD_OUT_PAIRS)
    cases = []
    for i, scene in enumerate(scenes):
        kept, new = scene.objects
        if held_out:
            colour, shape = pairs[i % len(pairs)]
            new = ShapeObject(colour, shape, new.position, new.size, new.jitter, new.half_size)
        cases.append((kept, new))
    return cases


def add_object(pipe, cases: list[tuple], first_seed: int, blur: int, examples: list | None = None) -> dict:
    from ldm_pipeline.shapes import Scene, caption, render

    rows, started = [], time.perf_counter()
    for i, (kept, new) in enumerate(cases):
        picture, mask = render(Scene((kept,))), quadrant_mask(new.position)
        prompt = caption(Scene((kept, new)))
        seed = first_seed + i
        result = pipe(prompt, image=picture, mask_image=mask, strength=1.0, mask_blur=blur, seed=seed,
                      progress=False).images[0]
        drawn = pipe(prompt, seed=seed, progress=False).images[0]  # the same prompt and seed from noise
        rows.append({"prompt": prompt, "seed": seed, "inpaint": judged(result, prompt),
                     "text_to_image": judged(drawn, prompt), "change": changes(result, picture, mask, blur)})
        if examples is not None and len(examples) < 4:
            examples.append((picture, mask, result))
    return {"cases": rows, "seconds": round(time.perf_counter() - started, 1)}


def outpaint_cases(n: int, seed: int) -> list[tuple]:
    """(kept object in a left corner, new object in a right corner), from `ldm eval`'s two-object scenes."""
    from ldm_pipeline.evaluation.accuracy import scenes_for, training_captions
    from ldm_pipeline.shapes import ShapeObject

    cases = []
    for i, scene in enumerate(scenes_for("two", n, seed + 1, exclude=training_captions(20_000))):
        kept, new = scene.objects
        kept_row = kept.position.split()[0]
        new_row = kept_row if i % 2 else ("bottom" if kept_row == "top" else "top")  # same row, other row in turn
        kept = ShapeObject(kept.colour, kept.shape, f"{kept_row} left", kept.size, kept.jitter, kept.half_size)
        new = ShapeObject(new.colour, new.shape, f"{new_row} right", new.size, new.jitter, new.half_size)
        cases.append((kept, new))
    return cases


def extend(pipe, cases: list[tuple], right: int, first_seed: int, blur: int, examples: list | None = None) -> dict:
    from ldm_pipeline.masks import outpaint
    from ldm_pipeline.shapes import Scene, caption, render

    rows, started = [], time.perf_counter()
    for i, (kept, new) in enumerate(cases):
        picture = render(Scene((kept,)))
        canvas, mask = outpaint(picture, right=right)
        prompt = caption(Scene((kept, new)))
        seed = first_seed + i
        result = pipe(prompt, image=canvas, mask_image=mask, strength=1.0, mask_blur=blur, seed=seed,
                      progress=False).images[0]
        rows.append({"prompt": prompt, "seed": seed, "size": list(result.size), "judge": judged(result, prompt),
                     "change": changes(result, picture, mask, blur)})
        if examples is not None and len(examples) < 4:
            examples.append((picture, canvas, result))
    return {"cases": rows, "seconds": round(time.perf_counter() - started, 1)}


def share(flags: list[bool]) -> dict:
    from ldm_pipeline.evaluation.accuracy import wilson_interval

    count = int(sum(flags))
    low, high = wilson_interval(count, len(flags))
    return {"right": count, "n": len(flags), "fraction": round(count / len(flags), 4),
            "interval95": [round(low, 4), round(high, 4)]}


def summarise_add(rows: list[dict]) -> dict:
    return {
        "n": len(rows),
        "inpaint": {"correct": share([r["inpaint"]["correct"] for r in rows]),
                    "strict": share([r["inpaint"]["strict"] for r in rows]),
                    "new_object_right": share([r["inpaint"]["objects_right"][1] for r in rows]),
                    "kept_object_right": share([r["inpaint"]["objects_right"][0] for r in rows]),
                    "with_extra_objects": sum(r["inpaint"]["extra"] > 0 for r in rows)},
        "text_to_image": {"correct": share([r["text_to_image"]["correct"] for r in rows]),
                          "strict": share([r["text_to_image"]["strict"] for r in rows])},
        "max_uint8_change": {key: max(r["change"][key] for r in rows) for key in ("outside_band", "band", "anywhere")},
    }


def summarise_extend(rows: list[dict]) -> dict:
    return {
        "n": len(rows), "size": rows[0]["size"],
        "correct": share([r["judge"]["correct"] for r in rows]),
        "strict": share([r["judge"]["strict"] for r in rows]),
        "new_object_right": share([r["judge"]["objects_right"][1] for r in rows]),
        "kept_object_right": share([r["judge"]["objects_right"][0] for r in rows]),
        "with_extra_objects": sum(r["judge"]["extra"] > 0 for r in rows),
        "original_unchanged_outside_band": sum(r["change"]["outside_band"] == 0 for r in rows),
        "max_uint8_change": {key: max(r["change"][key] for r in rows) for key in ("outside_band", "band", "anywhere")},
    }


def quality(n: int, held_out_n: int, outpaint_n: int, wide_n: int, blur: int, seed: int) -> tuple[dict, list]:
    from ldm_pipeline import LatentDiffusionPipeline

    torch.set_grad_enabled(False)
    pipe = LatentDiffusionPipeline.from_pretrained()
    report = {"model": "bundled", "scheduler": pipe.defaults.get("scheduler"),
              "steps": pipe.defaults["num_inference_steps"], "guidance_scale": pipe.defaults["guidance_scale"],
              "strength": 1.0, "mask_blur": blur, "masked_content": "original", "scene_seed": seed,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    added, widened = [], []
    tasks = {}
    runs = [("add_object", n, lambda: add_object(pipe, add_object_cases(n, seed, False), 0, blur, added)),
            ("add_object_held_out", held_out_n,
             lambda: add_object(pipe, add_object_cases(held_out_n, seed + 7, True), 10_000, blur)),
            ("outpaint_right_32", outpaint_n,
             lambda: extend(pipe, outpaint_cases(outpaint_n, seed), 32, 20_000, blur, widened)),
            ("outpaint_right_64", wide_n, lambda: extend(pipe, outpaint_cases(wide_n, seed), 64, 20_000, blur))]
    for name, count, run in runs:
        if not count:
            continue
        done = run()
        summary = (summarise_add if name.startswith("add") else summarise_extend)(done["cases"])
        tasks[name] = {"summary": summary, "seconds": done["seconds"], "cases": done["cases"]}
        print(f"{name}: {json.dumps(summary)} ({done['seconds']:.0f} s)", flush=True)
    report["tasks"] = tasks
    return report, list(zip(added, widened))


def percent(entry: dict) -> str:
    low, high = entry["interval95"]
    return f"{entry['right']}/{entry['n']} = {100 * entry['fraction']:.1f} % ({100 * low:.1f}-{100 * high:.1f})"


def quality_markdown(report: dict) -> str:
    tasks = report["tasks"]
    intro = (f"Model `{report['model']}`, {report['scheduler']}, {report['steps']} steps, guidance "
             f"{report['guidance_scale']}, strength {report['strength']}, `mask_blur` {report['mask_blur']}, "
             f"masked content \"{report['masked_content']}\"; one fixed seed per case. Judged by "
             "`evaluation.judge` (whole picture: every object right, nothing extra) and the strict measure. "
             "In brackets: 95 % intervals (Wilson). Changes are the largest difference of one channel, in "
             "uint8 levels, between the result and the picture.")
    header = ("| new object | n | judged right | strict | new object right | kept object right | text to image, "
              "same prompts: judged right | max change outside mask and band | max change in the band |")
    lines = [intro, "", "## Adding an object to a masked quadrant", "", header,
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, label in (("add_object", "training pairs"), ("add_object_held_out", "held-out pairs")):
        if name not in tasks:
            continue
        s = tasks[name]["summary"]
        i, t = s["inpaint"], s["text_to_image"]
        lines.append(f"| {label} | {s['n']} | {percent(i['correct'])} | {percent(i['strict'])} | "
                     f"{percent(i['new_object_right'])} | {percent(i['kept_object_right'])} | {percent(t['correct'])} | "
                     f"{s['max_uint8_change']['outside_band']} | {s['max_uint8_change']['band']} |")
    header = ("| canvas | n | judged right | new object right | kept object right | with extra objects | "
              "original part unchanged outside the band | max change outside the band | max change in the band |")
    lines += ["", "## Extending a scene sideways (`masks.outpaint`)", "", header,
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ("outpaint_right_32", "outpaint_right_64"):
        if name not in tasks:
            continue
        s = tasks[name]["summary"]
        lines.append(f"| 64x64 + {name.rsplit('_', 1)[1]} on the right = {s['size'][0]}x{s['size'][1]} | {s['n']} | "
                     f"{percent(s['correct'])} | {percent(s['new_object_right'])} | {percent(s['kept_object_right'])} | "
                     f"{s['with_extra_objects']} | {s['original_unchanged_outside_band']} of {s['n']} | "
                     f"{s['max_uint8_change']['outside_band']} | {s['max_uint8_change']['band']} |")
    for name, label in (("add_object", "training pairs"), ("add_object_held_out", "held-out pairs")):
        failed = [r for r in tasks.get(name, {}).get("cases", []) if not r["inpaint"]["correct"]]
        if failed:
            lines += ["", f"Judged wrong (adding an object, {label}): " + "; ".join(
                f"seed {r['seed']}, \"{r['prompt']}\": found {', '.join(r['inpaint']['found']) or 'nothing'}"
                for r in failed) + "."]
    wide = tasks.get("outpaint_right_64", {}).get("cases", [])
    if wide:
        first = wide[0]
        found = ", ".join(first["judge"]["found"])
        lines += ["", f"Outpainting to 128x64, the first case: \"{first['prompt']}\": found {found}."]
    return "\n".join(lines) + "\n"


def figure(examples: list, path: Path) -> None:
    """Inpainting examples (picture, mask, result) on the left, outpainting (picture, canvas, result) on the right."""
    from ldm_pipeline import make_grid

    left, right = [], []
    for (picture, mask, result), (small, canvas, widened) in examples:
        overlay = PIL.Image.composite(PIL.Image.new("RGB", picture.size, (255, 255, 255)), picture,
                                      mask.point(lambda v: v * 3 // 5))
        left += [picture, overlay, result]
        right += [small, canvas, widened]
    grids = [make_grid(left, cols=3, scale=2, col_labels=["picture", "mask (white)", "inpainted"]),
             make_grid(right, cols=3, scale=2, col_labels=["picture", "outpaint canvas", "outpainted"])]
    gap = 16
    whole = PIL.Image.new("RGB", (grids[0].width + gap + grids[1].width, max(g.height for g in grids)), "white")
    whole.paste(grids[0], (0, 0))
    whole.paste(grids[1], (grids[0].width + gap, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    whole.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("speed", "quality", "all"), default="all")
    parser.add_argument("--size", type=int, default=256, help="speed: the picture's side")
    parser.add_argument("--steps", type=int, default=4, help="speed: num_inference_steps")
    parser.add_argument("--strength", type=float, default=0.75, help="speed: strength of both calls")
    parser.add_argument("--repeats", type=int, default=5, help="speed: timed calls of each kind")
    parser.add_argument("--no-nine", action="store_true", help="speed: leave out the 9-channel UNet")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="speed: wall time (quiet machine), or the process's CPU time (OMP_NUM_THREADS=1 on a "
                             "shared machine)")
    parser.add_argument("--n", type=int, default=120, help="quality: cases of adding an object (training pairs)")
    parser.add_argument("--held-out-n", type=int, default=30, help="quality: cases with a held-out new object")
    parser.add_argument("--outpaint-n", type=int, default=40, help="quality: cases of outpainting by 32")
    parser.add_argument("--wide-n", type=int, default=20, help="quality: cases of outpainting by 64")
    parser.add_argument("--mask-blur", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="quality: selects the scenes")
    parser.add_argument("--speed-out", type=Path, default=SPEED_OUT)
    parser.add_argument("--out", type=Path, default=QUALITY_OUT, help="quality: JSON; the table goes beside it (.md)")
    parser.add_argument("--figure", type=Path, default=FIGURE_OUT)
    parser.add_argument("--table-only", action="store_true", help="quality: write the table again from --out's JSON")
    args = parser.parse_args()

    if args.table_only:
        table = quality_markdown(json.loads(args.out.read_text()))
        args.out.with_suffix(".md").write_text(table)
        print(table)
        return

    if args.part in ("speed", "all"):
        result = speed(args.size, args.steps, args.strength, args.repeats, args.clock, not args.no_nine)
        result["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
        args.speed_out.parent.mkdir(parents=True, exist_ok=True)
        args.speed_out.write_text(json.dumps(result, indent=1) + "\n")
        print(speed_table(result))
        print(f"outside the mask and its band, largest uint8 change: {result['max_uint8_change_outside_band']}")
        print(f"wrote {args.speed_out}", flush=True)
    if args.part in ("quality", "all"):
        report, examples = quality(args.n, args.held_out_n, args.outpaint_n, args.wide_n, args.mask_blur, args.seed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        table = quality_markdown(report)
        args.out.with_suffix(".md").write_text(table)
        print(table)
        if examples:
            figure(examples, args.figure)
        print(f"wrote {args.out}, {args.out.with_suffix('.md')} and {args.figure}")


if __name__ == "__main__":
    main()

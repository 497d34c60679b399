"""The bundled edge ControlNet on hand-drawn outlines: is each object drawn where its outline is, in its shape?

    python benchmarks/controlnet_edges.py                    # about 2 minutes on one CPU core

1. Twelve outlines drawn by hand (PIL ImageDraw: one-pixel white lines on black, 64x64): circles,
   squares and triangles in the corners and the centre, small, default and large; each with a
   prompt that names only a colour and a shape ("an orange circle"), no position and no size.
2. Each prompt drawn with the outline as control picture (the bundled model's defaults: ddim,
   50 steps, guidance 2.5), for four seeds, and for the same seeds without the ControlNet.
3. The judge (`evaluation.judge`) reads every picture against the caption the outline stands for
   ("an orange circle in the bottom right"): right when the object has the prompt's colour and the
   outline's shape and position and nothing else is drawn. Also reported: the size word, and how
   far the drawn object's centre lies from the outline's (pixels).
4. The cost of a denoising step with and without the ControlNet: whole calls of 2 and 12 steps,
   alternating, several times; a step's cost is the difference over the 10 steps (the median over
   the repeats), so text encoding and decoding, the same in both, drop out.
5. Beyond the data, reported apart: two outlines for a prompt of two objects, and outlines away from the
   five places the data puts objects (right when each object's centre is within 4 pixels of its outline's).
Writes docs/results/controlnet-edges.{json,md} and docs/figures/controlnet-edges{,-further}.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ldm_pipeline import LatentDiffusionPipeline, make_grid
from ldm_pipeline.evaluation.accuracy import wilson_interval
from ldm_pipeline.evaluation.judge import find_objects, judge
from ldm_pipeline.loading.controlnet import load_controlnet
from ldm_pipeline.shapes import HELD_OUT_PAIRS, POSITIONS, SIZES

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "ldm_pipeline" / "models" / "shapes-edges"
SIDE = 64

# (colour, shape, position, size word): every shape in every corner and the centre, every size, every colour;
# the first is the example of the issue ("an orange circle" with a circle in the bottom right), a held-out pair
CASES = [
    ("orange", "circle", "bottom right", "default"),
    ("red", "square", "top left", "large"),
    ("blue", "triangle", "top right", "default"),
    ("yellow", "circle", "bottom left", "small"),
    ("green", "square", "center", "default"),
    ("purple", "circle", "top right", "large"),
    ("white", "triangle", "bottom left", "default"),
    ("black", "square", "bottom right", "small"),
    ("red", "triangle", "center", "large"),
    ("blue", "circle", "top left", "default"),
    ("yellow", "square", "top right", "small"),
    ("green", "triangle", "bottom right", "large"),
]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# Beyond the data: two outlines for a prompt of two objects (the outline's shape says which is which; then the
# same with the positions named), and outlines away from the five places the data puts objects.
# (prompt, [(colour, shape, centre (x, y) of its box, half-size)])
FURTHER = [
    ("a red circle and a blue square", [("red", "circle", (0.27, 0.27), 0.14), ("blue", "square", (0.73, 0.73), 0.14)]),
    ("a yellow triangle and a green circle", [("green", "circle", (0.27, 0.73), 0.12),
                                              ("yellow", "triangle", (0.73, 0.27), 0.17)]),
    # the same two with the positions named
    ("a red circle in the top left and a blue square in the bottom right",
     [("red", "circle", (0.27, 0.27), 0.14), ("blue", "square", (0.73, 0.73), 0.14)]),
    ("a green circle in the bottom left and a yellow triangle in the top right",
     [("green", "circle", (0.27, 0.73), 0.12), ("yellow", "triangle", (0.73, 0.27), 0.17)]),
    ("a blue circle", [("blue", "circle", (0.5, 0.22), 0.13)]),  # top middle
    ("an orange square", [("orange", "square", (0.62, 0.40), 0.10)]),  # between the centre and a corner
]
NEAR_PX = 4.0  # beyond the data, an object is in place when its centre is this close to its outline's


def outline(objects: list[tuple[str, tuple[float, float], float]]) -> Image.Image:
    """A hand-drawn outline: one-pixel white lines on black, each shape's box centred at (x, y) (fractions of the
    side), half-size h (a fraction of the side)."""
    picture = Image.new("RGB", (SIDE, SIDE))
    draw = ImageDraw.Draw(picture)
    for shape, (x, y), h in objects:
        x, y, h = x * SIDE, y * SIDE, h * SIDE
        box = [round(x - h), round(y - h), round(x + h) - 1, round(y + h) - 1]
        if shape == "circle":
            draw.ellipse(box, outline="white")
        elif shape == "square":
            draw.rectangle(box, outline="white")
        else:  # pointing up, as the shapes data draws triangles
            left, top, right, bottom = box
            draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], outline="white")
    return picture


def case_outline(case) -> Image.Image:
    _, shape, position, size = case
    return outline([(shape, POSITIONS[position], sum(SIZES[size]) / 2)])


def centroid(shape: str, box_centre: tuple[float, float], h: float) -> tuple[float, float]:
    """Where the judge finds the centre of a shape whose box is centred at `box_centre`: a triangle's area centre
    lies a third of its half-size below its box's."""
    x, y = box_centre
    return (x, y + h / 3) if shape == "triangle" else (x, y)


def placed(image, objects) -> dict:
    """Beyond the data: right when each outline holds an object of its colour and shape, its centre within
    `NEAR_PX` of the outline's, and nothing else is drawn."""
    found = find_objects(image)
    offsets, free = [], list(found)
    for colour, shape, box_centre, h in objects:
        candidates = [f for f in free if f.colour == colour and f.shape == shape]
        centre = centroid(shape, box_centre, h)
        distances = [float(np.linalg.norm(np.subtract(f.centroid, centre))) * SIDE for f in candidates]
        if not distances:
            offsets.append(None)
            continue
        best = int(np.argmin(distances))
        offsets.append(round(distances[best], 2))
        free.remove(candidates[best])
    return {"right": all(o is not None and o <= NEAR_PX for o in offsets) and not free,
            "centre_offsets_px": offsets, "extra": len(free)}


def verdict(image, case) -> dict:
    colour, shape, position, size = case
    words = ([size] if size != "default" else []) + [colour, shape]
    seen = judge(image, f"{article(words[0])} {' '.join(words)} in the {position}")
    centre = np.array(centroid(shape, POSITIONS[position], sum(SIZES[size]) / 2)) * SIDE
    found = [seen.found[f] for e, f in seen.pairs]
    offset = float(np.linalg.norm(np.array(found[0].centroid) * SIDE - centre)) if found else None
    return {"right": seen.correct, "colour": seen.colour, "shape": seen.shape, "position": seen.position,
            "size": seen.size, "extra": seen.extra, "centre_offset_px": None if offset is None else round(offset, 2)}


def per_step_seconds(pipe, net, picture, repeats: int, short: int = 2, long: int = 12) -> tuple[float, float]:
    """Seconds (process CPU time) a denoising step takes without and with the ControlNet."""
    def call(steps, control):
        extra = dict(controlnet=net, control_image=picture) if control else {}
        start = time.process_time()
        pipe("an orange circle", num_inference_steps=steps, seed=0, progress=False, output_type="np", **extra)
        return time.process_time() - start

    plain, controlled = [], []
    call(short, False), call(short, True)  # warm-up
    for _ in range(repeats):
        for control, into in ((False, plain), (True, controlled)):
            into.append((call(long, control) - call(short, control)) / (long - short))
    return statistics.median(plain), statistics.median(controlled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--controlnet", default=str(BUNDLED), help="the ControlNet folder (default: the bundled one)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per outline")
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps per picture (the model's default: 50)")
    parser.add_argument("--name", default="controlnet-edges", help="docs/results/NAME.{json,md}, docs/figures/NAME.png")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)

    pipe = LatentDiffusionPipeline.from_pretrained()
    net = load_controlnet(args.controlnet, torch_dtype=torch.float32)
    pictures = [case_outline(case) for case in CASES]
    prompts = [f"{article(colour)} {colour} {shape}" for colour, shape, _, _ in CASES]
    seeds = list(range(args.seeds))
    rows, drawn, plain = [], [], []
    for case, picture, prompt in zip(CASES, pictures, prompts):
        batch = [prompt] * len(seeds)
        kw = dict(seed=seeds, num_inference_steps=args.steps, progress=False)
        with_net = pipe(batch, controlnet=net, control_image=picture, **kw).images
        without = pipe(batch, **kw).images
        drawn.append(with_net)
        plain.append(without)
        rows.append({"prompt": prompt, "outline": dict(zip(("shape", "position", "size"), case[1:])),
                     "held_out_pair": (case[0], case[1]) in HELD_OUT_PAIRS,
                     "with_controlnet": [verdict(image, case) for image in with_net],
                     "without": [verdict(image, case) for image in without]})
        print(f"{prompt:>22} -> {case[2]:>12} {case[3]:>7}: "
              f"{''.join('01'[v['right']] for v in rows[-1]['with_controlnet'])} "
              f"(without: {''.join('01'[v['right']] for v in rows[-1]['without'])})", flush=True)

    further, further_drawn = [], []
    for prompt, objects in FURTHER:
        picture = outline([(shape, centre, h) for _, shape, centre, h in objects])
        kw = dict(seed=seeds, num_inference_steps=args.steps, progress=False)
        images = pipe([prompt] * len(seeds), controlnet=net, control_image=picture, **kw).images
        further_drawn.append((picture, images))
        further.append({"prompt": prompt, "outlines": [{"colour": c, "shape": s, "centre": list(xy), "half_size": h}
                                                       for c, s, xy, h in objects],
                        "with_controlnet": [placed(image, objects) for image in images]})
        print(f"{prompt:>72}: {''.join('01'[v['right']] for v in further[-1]['with_controlnet'])}", flush=True)

    def summary(key: str) -> dict:
        verdicts = [v for row in rows for v in row[key]]
        right = sum(v["right"] for v in verdicts)
        first = sum(row[key][0]["right"] for row in rows)
        offsets = [v["centre_offset_px"] for v in verdicts if v["centre_offset_px"] is not None]
        low, high = wilson_interval(right, len(verdicts))
        return {"right": right / len(verdicts), "n": len(verdicts), "interval_95": [round(low, 3), round(high, 3)],
                "right_seed_0": f"{first}/{len(rows)}",
                **{k: float(np.mean([v[k] for v in verdicts])) for k in ("colour", "shape", "position", "size")},
                "median_centre_offset_px": round(statistics.median(offsets), 2) if offsets else None}

    results = {"with_controlnet": summary("with_controlnet"), "without": summary("without")}
    further_right = [v["right"] for row in further for v in row["with_controlnet"]]
    results["further"] = {"right": float(np.mean(further_right)), "n": len(further_right), "near_px": NEAR_PX}
    print(json.dumps(results, indent=2), flush=True)
    plain_step, controlled_step = per_step_seconds(pipe, net, pictures[0], args.repeats)
    timing = {"plain_step_ms": round(plain_step * 1000, 2), "controlnet_step_ms": round(controlled_step * 1000, 2),
              "ratio": round(controlled_step / plain_step, 3), "repeats": args.repeats, "threads": 1,
              "clock": "process CPU time", "batch": "1 image, classifier-free guidance (2 rows)"}
    print(json.dumps(timing), flush=True)
    if args.no_write:
        return

    config = json.loads((Path(args.controlnet) / "config.json").read_text())
    parameters = sum(p.numel() for p in net.parameters())
    report = {"controlnet": Path(args.controlnet).name, "parameters": parameters,
              "conditioning_embedding_out_channels": config["conditioning_embedding_out_channels"],
              "settings": {"scheduler": "ddim", "num_inference_steps": args.steps, "guidance_scale": 2.5,
                           "controlnet_conditioning_scale": 1.0, "seeds": seeds},
              **results, "step_cost": timing, "outlines": rows, "further_outlines": further}
    (ROOT / "docs" / "results" / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    a, b = results["with_controlnet"], results["without"]
    lines = [f"Hand-drawn outlines (one-pixel white lines on black, 64x64) with prompts that name only colour and "
             f"shape; ddim, {args.steps} steps, guidance 2.5 (the bundled model's default), "
             f"seeds {seeds[0]}-{seeds[-1]}. "
             "Right: the judge finds the prompt's colour in the outline's shape and position, and nothing else.", "",
             "| | right | 95 % interval | seed 0 | colour | shape | position | size | centre offset (px, median) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in (("with the ControlNet", a), ("without", b)):
        lines.append(f"| {name} | {s['right']:.0%} ({round(s['right'] * s['n'])}/{s['n']}) | "
                     f"{s['interval_95'][0]:.0%}-{s['interval_95'][1]:.0%} | {s['right_seed_0']} | {s['colour']:.0%} | "
                     f"{s['shape']:.0%} | {s['position']:.0%} | {s['size']:.0%} | {s['median_centre_offset_px']} |")
    lines += ["", "| prompt | outline | with the ControlNet | without |", "|---|---|---|---|"]
    for row in rows:
        o = row["outline"]
        held = " (held-out pair)" if row["held_out_pair"] else ""
        marks = ["".join("✓" if v["right"] else "✗" for v in row[key]) for key in ("with_controlnet", "without")]
        lines.append(f"| {row['prompt']}{held} | {o['size']} {o['shape']}, {o['position']} | {marks[0]} | {marks[1]} |")
    lines += ["", f"Beyond the data (not part of the target): two outlines for a prompt naming two objects, and "
                  f"outlines away from the five places the data puts objects; right when each object has its "
                  f"colour and its outline's shape, its centre within {NEAR_PX:g} pixels of the outline's, and nothing "
                  f"else is drawn: {results['further']['right']:.0%} of {results['further']['n']}.", "",
              "| prompt | outlines (centre x, y; half-size; fractions of the side) | right | centre offsets (px) |",
              "|---|---|---|---|"]
    for row in further:
        shapes = "; ".join(f"{o['shape']} ({o['centre'][0]:g}, {o['centre'][1]:g}; {o['half_size']:g})"
                           for o in row["outlines"])
        offsets = " ".join("/".join("-" if o is None else f"{o:.1f}" for o in v["centre_offsets_px"])
                           for v in row["with_controlnet"])
        marks = "".join("✓" if v["right"] else "✗" for v in row["with_controlnet"])
        lines.append(f"| {row['prompt']} | {shapes} | {marks} | {offsets} |")
    lines += ["", f"A denoising step (1 image with classifier-free guidance, 1 thread, process CPU time, median of "
                  f"{args.repeats}): {timing['plain_step_ms']} ms without, {timing['controlnet_step_ms']} ms with "
                  f"the ControlNet: {timing['ratio']:.2f} times.", ""]
    (ROOT / "docs" / "results" / f"{args.name}.md").write_text("\n".join(lines))

    cells, labels = [], ["outline"] + [f"seed {s}" for s in seeds] + ["without, seed 0"]
    for picture, with_net, without in zip(pictures, drawn, plain):
        cells.append([picture, *with_net, without[0]])
    grid = make_grid([column[r] for r in range(len(labels)) for column in cells], rows=len(labels), cols=len(cells),
                     row_labels=labels, col_labels=prompts, scale=2, font_size=11)
    grid.save(ROOT / "docs" / "figures" / f"{args.name}.png")
    beyond = make_grid([column[r] for r in range(1 + len(seeds)) for column in
                        [[picture, *images] for picture, images in further_drawn]],
                       rows=1 + len(seeds), cols=len(further_drawn), row_labels=labels[:-1],
                       col_labels=[prompt for prompt, _ in FURTHER], scale=2, font_size=11)
    beyond.save(ROOT / "docs" / "figures" / f"{args.name}-further.png")
    print(f"wrote docs/results/{args.name}.json, .md and docs/figures/{args.name}.png, {args.name}-further.png")


if __name__ == "__main__":
    main()

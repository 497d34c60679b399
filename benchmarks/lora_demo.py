"""Teach the bundled model a shape it has never seen with a LoRA, and measure it before and after.

    python benchmarks/lora_demo.py --run-dir runs/star          # about 15 minutes on 2 CPU cores

1. `ldm shapes-data star`: 1000 scenes with a star (sometimes beside an ordinary object) and 500
   ordinary training scenes, so the old prompts keep being seen.
2. The judge on 100 star prompts and on 100 + 100 old prompts (one object seen in training; two
   objects), with the bundled model as it is.
3. `ldm train configs/lora.json --data ...` (timed: the wall-clock time of the command).
4. The same prompts and seeds with the LoRA loaded.
Writes docs/results/lora-star.{json,md}, docs/figures/lora-star.png and copies the LoRA into
docs/results/lora-star/ (what the train_your_own notebook loads).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


from ldm_pipeline import LatentDiffusionPipeline, make_grid
from ldm_pipeline.evaluation.accuracy import judge_images
from ldm_pipeline.shapes import caption, eval_prompts, new_shape_scenes

ROOT = Path(__file__).resolve().parents[1]


def prompt_sets(n: int) -> dict[str, list[str]]:
    stars = [caption(s) for s in new_shape_scenes("star", n, seed=99, two_objects_prob=0.0)]
    return {"star": stars, "seen": eval_prompts("seen", n, 7), "two": eval_prompts("two", n, 7)}


def measure(pipe, sets: dict[str, list[str]], batch: int = 50) -> tuple[dict, dict]:
    scores, samples = {}, {}
    for name, prompts in sets.items():
        images = []
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            images += pipe(chunk, seed=list(range(start, start + len(chunk))), progress=False).images
        scores[name] = judge_images(images, prompts)
        samples[name] = images[:8]
    return scores, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/star"))
    parser.add_argument("--n", type=int, default=100, help="prompts per set")
    parser.add_argument("--steps", type=int, default=None, help="override the config's steps")
    args = parser.parse_args()
    data = args.run_dir / "data"
    if not (data / "metadata.jsonl").is_file():  # written once; a second run trains on the same data
        subprocess.run([sys.executable, "-m", "ldm_pipeline", "shapes-data", "star", "--out", str(data)],
                       check=True)
    sets = prompt_sets(args.n)

    pipe = LatentDiffusionPipeline.from_pretrained()
    before, before_samples = measure(pipe, sets)
    print("before:", json.dumps({k: round(v["correct"], 3) for k, v in before.items()}), flush=True)

    command = [sys.executable, "-m", "ldm_pipeline", "train", str(ROOT / "configs" / "lora.json"),
               "--data", str(data), "--run-dir", str(args.run_dir)]
    if args.steps:
        command += ["--steps", str(args.steps)]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    train_seconds = time.perf_counter() - start
    lora = args.run_dir / "lora" / "lora"

    pipe.load_lora_weights(lora, adapter_name="star")
    after, after_samples = measure(pipe, sets)
    print("after:", json.dumps({k: round(v["correct"], 3) for k, v in after.items()}), flush=True)

    config = json.loads((ROOT / "configs" / "lora.json").read_text())
    result = {"train_seconds": round(train_seconds, 1), "steps": args.steps or config["loop"]["steps"],
              "batch_size": config["loop"]["batch_size"], "prompts_per_set": args.n,
              "before": before, "after": after, "lora_bytes": (lora / "pytorch_lora_weights.safetensors").stat().st_size}
    results = ROOT / "docs" / "results"
    (results / "lora-star.json").write_text(json.dumps(result, indent=2))
    rows = ["| prompts | before: correct | shape | after: correct | shape |", "|---|---:|---:|---:|---:|"]
    for name in sets:
        rows.append(f"| {name} | {before[name]['correct']:.0%} | {before[name]['shape']:.0%} | "
                    f"{after[name]['correct']:.0%} | {after[name]['shape']:.0%} |")
    (results / "lora-star.md").write_text("\n".join(rows) + f"\n\nTraining: {train_seconds / 60:.1f} min.\n")
    grid = make_grid(before_samples["star"] + after_samples["star"], rows=2,
                     row_labels=["bundled model", "with the star LoRA"], col_labels=sets["star"][:8], scale=2)
    grid.save(ROOT / "docs" / "figures" / "lora-star.png")
    shutil.rmtree(results / "lora-star", ignore_errors=True)
    shutil.copytree(lora, results / "lora-star")
    print("\n".join(rows))
    print(f"trained in {train_seconds / 60:.1f} min; wrote docs/results/lora-star.*", flush=True)


if __name__ == "__main__":
    main()

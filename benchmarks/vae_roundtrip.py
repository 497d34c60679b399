"""How much of the strict measure a VAE alone keeps: renders encoded, decoded and judged.

A diffusion model can draw no sharper than its VAE decodes, so this is the ceiling of the strict
measure (`evaluation/strict.py`) for a model built on that VAE. For each evaluation kind it takes
the real renders of `ldm eval`'s prompts (the same prompts and scenes), passes them through
`decode(encode(x).mean)` and reports the judge's and the strict measure's "correct", the share of
objects whose asked shape fits below the IoU bar or the margin, and the mean squared error (0-255).

    python benchmarks/vae_roundtrip.py                                 # the bundled model's VAE
    python benchmarks/vae_roundtrip.py runs/shapes/vae/model other/vae --n 200 --out roundtrip.json
    python benchmarks/vae_roundtrip.py runs/shapes/vae/model --n 100 --by-pair     # one-object kinds by pair and size
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from ldm_pipeline import DEFAULT_MODEL
from ldm_pipeline.evaluation import strict
from ldm_pipeline.evaluation.accuracy import training_captions
from ldm_pipeline.evaluation.report import shapes_sets


@torch.no_grad()
def round_trip(vae: AutoencoderKL, images) -> np.ndarray:
    """Images -> VAE -> uint8 HxWx3 arrays."""
    x = torch.stack([torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 127.5 - 1 for image in images])
    y = vae.decode(vae.encode(x).latent_dist.mean).sample
    return ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def measure(vae: AutoencoderKL, n: int) -> dict:
    """Per evaluation kind: judge and strict "correct", failing fits, MSE of the round trip."""
    result = {}
    for kind in shapes_sets(n, 0, training_captions(20_000)):
        decoded = round_trip(vae, kind.real)
        verdicts = [strict.strict_judge(image, prompt) for image, prompt in zip(decoded, kind.prompts)]
        fits = [fit for verdict in verdicts for fit in verdict.fits if fit is not None]
        real = np.stack([np.asarray(image) for image in kind.real]).astype(float)
        result[kind.name] = {
            "judge": float(np.mean([v.judge.correct for v in verdicts])),
            "strict": float(np.mean([v.correct for v in verdicts])),
            "below_iou": float(np.mean([fit.iou[fit.asked] < strict.MIN_IOU for fit in fits])),
            "below_margin": float(np.mean([fit.margin < strict.MARGIN for fit in fits])),
            "mse": float(((decoded.astype(float) - real) ** 2).mean()),
        }
    return result


def by_pair(vae: AutoencoderKL, n: int) -> dict:
    """One-object kinds: the strict "correct" share per colour/shape pair and per size word."""
    result = {}
    for kind in shapes_sets(n, 0, training_captions(20_000), kinds=("seen", "held_out")):
        verdicts = [strict.strict_judge(image, prompt) for image, prompt in zip(round_trip(vae, kind.real), kind.prompts)]
        result[kind.name] = strict.by_pair(verdicts, kind.prompts)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vaes", nargs="*", default=[str(DEFAULT_MODEL / "vae")], help="AutoencoderKL folders")
    parser.add_argument("--n", type=int, default=200, help="prompts per kind (default 200)")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    parser.add_argument("--by-pair", action="store_true", help="one-object kinds by colour/shape pair and size")
    args = parser.parse_args()
    if args.by_pair:
        results = {path: by_pair(AutoencoderKL.from_pretrained(path).eval(), args.n) for path in args.vaes}
        for path, kinds in results.items():
            for kind, groups in kinds.items():
                print(path, kind, ", ".join(f"{k} {g['strict']:.0%} ({g['n']})" for k, g in groups.items()))
        if args.out:
            Path(args.out).write_text(json.dumps({"n": args.n, "by_pair": results}, indent=2))
        return
    results = {}
    print("| VAE | kind | judge | strict | below IoU | below margin | MSE |\n|---|---|---:|---:|---:|---:|---:|")
    for path in args.vaes:
        vae = AutoencoderKL.from_pretrained(path).eval()
        results[path] = measure(vae, args.n)
        for kind, r in results[path].items():
            print(f"| {path} | {kind} | {r['judge']:.1%} | {r['strict']:.1%} | {r['below_iou']:.1%} | "
                  f"{r['below_margin']:.1%} | {r['mse']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"n": args.n, "results": results}, indent=2))


if __name__ == "__main__":
    main()

"""Evaluate a pipeline: generate for prompt sets, score (prompt accuracy, CLIP score, FID), report.

`evaluate` produces one report (a dict that is written as JSON, and a Markdown table);
`sweep` repeats it over steps, schedulers and guidance scales and `plot_sweep` draws the
trade-off. Every image is drawn from a recorded seed, so a report is reproducible.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from ..images import load_image
from ..output import steps_text
from ..shapes import caption, composed_caption, eval_scenes, render, scene_regions
from .accuracy import INTERVAL_KEYS, KINDS, intervals, judge_images, scenes_for
from .clip import Clip
from .fid import FeatureStats, cached_stats, feature_stats, frechet_distance

KIND_TITLES = {"held_out": "held-out"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REFERENCE_SEED = 1_000_003  # the independent real renders FID compares against (never an eval seed)


@dataclass
class PromptSet:
    """Prompts to generate for, and what to compare with.

    `real` are real images of the same prompts (the shapes renders), giving the floor of FID and
    the CLIP score of real images; `judged` sets are read by the shapes judge.
    """

    name: str
    prompts: list[str]
    real: list[PIL.Image.Image] | None = None
    judged: bool = False
    drawn: list[str] | None = None  # the texts the images are drawn from, where they differ from `prompts`
    regions: list | None = None  # per drawn text, its parts' boxes (`regions=`), for composed prompts


def shapes_sets(n: int, seed: int = 0, exclude: set[str] = frozenset(), kinds=KINDS,
                composed: bool = False, regions: bool = False) -> list[PromptSet]:
    """`n` shapes prompts per kind (seen pairs, held-out pairs, two objects, three objects) with their renders;
    with `composed`, drawn from the captions with their objects joined by AND (`composed_caption`), and
    with `regions` too each object's part kept to its position's box (`scene_regions`)."""
    sets = []
    for kind in kinds:
        scenes = scenes_for(kind, n, seed, exclude)
        drawn = [composed_caption(s) for s in scenes] if composed or regions else None
        sets.append(PromptSet(kind, [caption(s) for s in scenes], [render(s) for s in scenes], judged=True,
                              drawn=drawn, regions=[scene_regions(s) for s in scenes] if regions else None))
    return sets


def shapes_reference(n: int, kinds=KINDS) -> dict[str, list[PIL.Image.Image]]:
    """`n` independent real renders per kind, from a seed no evaluation uses: what FID compares against."""
    return {kind: [render(scene) for scene in eval_scenes(kind, n, REFERENCE_SEED)] for kind in kinds}


def reference_stats(real: dict[str, list[PIL.Image.Image]], extractor, cache_dir=None) -> dict[str, FeatureStats]:
    """FID statistics of the real images of each set, and of all together ("all") when there are several.

    Each is computed once and then read from the cache, keyed by a hash of the images and extractor.
    """
    stats = {name: cached_stats(images, extractor, cache_dir) for name, images in real.items()}
    if len(real) > 1:
        stats["all"] = cached_stats([image for images in real.values() for image in images], extractor, cache_dir)
    return stats


def file_set(path: str | Path, n: int) -> PromptSet:
    """`n` prompts from a text file, one per line (blank lines skipped), repeated in order if it is short."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`prompts`: got {str(path)!r}; expected 'shapes' or a text file with one prompt per line")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"`prompts`: {str(path)!r} has no prompts; expected one prompt per line")
    return PromptSet(path.stem, [lines[i % len(lines)] for i in range(n)])


def folder_images(path: str | Path) -> list[PIL.Image.Image]:
    """The images in a folder (not its subfolders), in name order."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else []
    if len(files) < 2:
        raise ValueError(f"`real`: got {str(path)!r}; expected a folder with at least 2 images "
                         f"({', '.join(IMAGE_SUFFIXES)})")
    return [load_image(file) for file in files]


def parse_seeds(text: str | int, n: int) -> list[int]:
    """`n` seeds from "S" (S, S+1, ...), "A-B" (A to B inclusive) or "a,b,c"; image i uses seed i."""
    text = str(text).strip()
    try:
        if "," in text:
            seeds = [int(part) for part in text.split(",")]
        elif "-" in text[1:]:
            low, high = (int(part) for part in text.split("-", 1))
            seeds = list(range(low, high + 1))
        else:
            seeds = [int(text) + i for i in range(n)]
    except ValueError:
        raise ValueError(f"`seeds`: got {text!r}; expected a first seed (0), a range (0-99) or a list (1,5,9)") from None
    if len(seeds) < n:
        raise ValueError(f"`seeds`: got {len(seeds)} seeds ({text!r}); expected at least n = {n}")
    return seeds[:n]


def seeds_text(seeds: list[int]) -> str:
    """"A-B" for consecutive seeds, else the list "a,b,c" (`parse_seeds` reads both back)."""
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def draw(pipe, prompts: list[str], seeds: list[int], batch_size: int = 25, regions: list | None = None,
         **call_kwargs):
    """Images for `prompts`, image i from `seeds[i]` (and `regions[i]`, for composed prompts); returns
    (images, the last call's output, seconds)."""
    images, result, start = [], None, time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        if regions is not None:
            call_kwargs["regions"] = regions[i:i + batch_size]
        result = pipe(prompts[i:i + batch_size], seed=seeds[i:i + batch_size], progress=False, **call_kwargs)
        images += result.images
    return images, result, time.perf_counter() - start


def _scores(images, prompts, features, reference: FeatureStats | None, clip: Clip, judged: bool) -> dict:
    scores = {"n": len(images), "clip_score": float(clip.score(images, prompts).mean())}
    if reference is not None:
        scores["fid"] = frechet_distance(feature_stats(features), reference)
    if judged:
        scores.update(judge_images(images, prompts))
        scores["interval_95"] = intervals(scores)
    return scores


def real_scores(sets: list[PromptSet], clip: Clip, extractor, references: dict[str, FeatureStats] | None = None
                ) -> dict[str, tuple[dict, np.ndarray]]:
    """The real images' side of a report, which no generation setting changes.

    Returns:
        For each set with real images, by name: its "clip_score_real" (and "fid_real" against
        the set's reference, where there is one) and the real images' features.
    """
    references, scored = references or {}, {}
    for prompt_set in sets:
        if prompt_set.real is None:
            continue
        features = extractor(prompt_set.real)
        scores = {"clip_score_real": float(clip.score(prompt_set.real, prompt_set.prompts).mean())}
        if prompt_set.name in references:
            scores["fid_real"] = frechet_distance(feature_stats(features), references[prompt_set.name])
        scored[prompt_set.name] = (scores, features)
    return scored


def evaluate(pipe, sets: list[PromptSet], seeds: list[int], clip: Clip, extractor,
             references: dict[str, FeatureStats] | None = None, batch_size: int = 25,
             real: dict[str, tuple[dict, np.ndarray]] | None = None, **call_kwargs) -> dict:
    """Generate for every prompt set and score the images.

    Args:
        pipe: a `LatentDiffusionPipeline` (or anything called the same way).
        sets: the prompt sets; image i of each set is drawn from `seeds[i]`.
        clip: the CLIP model for CLIP score.
        extractor: the FID feature extractor (its `name` goes into the report).
        references: feature statistics of the real images FID compares against, by set name
            (see `reference_stats`; "all" for the sets together); a set without one gets no FID.
        real: `real_scores(sets, clip, extractor, references)`, computed here when not given
            (a sweep computes it once for all its settings).
        call_kwargs: passed to `pipe` (num_inference_steps, guidance_scale, ...).

    Returns:
        A report: the settings used, and per set and for all sets together "n", "clip_score",
        "fid" (with a reference), the judge's attributes (shapes sets), and for sets with real
        images "clip_score_real" and "fid_real" (the same measures on real images of the same
        prompts: the best a model could do at this sample size).
    """
    references = references or {}
    real = real if real is not None else real_scores(sets, clip, extractor, references)
    report = {"features": extractor.name, "clip": clip.name, "seeds": seeds_text(seeds), "sets": {}}
    generated, samples, seconds, last = [], {}, 0.0, None
    for prompt_set in sets:
        images, last, spent = draw(pipe, prompt_set.drawn or prompt_set.prompts, seeds[:len(prompt_set.prompts)],
                                   batch_size, prompt_set.regions, **call_kwargs)
        seconds += spent
        features = extractor(images)
        scores = _scores(images, prompt_set.prompts, features, references.get(prompt_set.name), clip,
                         prompt_set.judged)
        scores.update(real[prompt_set.name][0] if prompt_set.name in real else {})
        # which prompts, so that `compare` pairs only reports of the same ones
        scores["prompts_digest"] = hashlib.sha256("\n".join(prompt_set.prompts).encode()).hexdigest()[:16]
        report["sets"][prompt_set.name] = scores
        generated.append(features)
        samples[prompt_set.name] = images[:32]
    report["settings"] = {"num_inference_steps": last.num_inference_steps, "scheduler": last.scheduler,
                          "guidance_scale": last.guidance_scale,
                          "clip_guidance_scale": float(call_kwargs.get("clip_guidance_scale", 0.0)),
                          "prompt_composition": bool(call_kwargs.get("prompt_composition", False)),
                          "regions": any(s.regions is not None for s in sets)}
    if len(sets) > 1:
        real_features = [real[s.name][1] for s in sets if s.name in real]
        report["all"] = _pooled(report["sets"], generated, real_features, references.get("all"))
        if any(key in report["all"] for key in INTERVAL_KEYS):
            report["all"]["interval_95"] = intervals(report["all"])
    report["timing"] = {"seconds_per_image": seconds / max(sum(len(s.prompts) for s in sets), 1)}
    report["images"] = samples  # popped before saving
    return report


def _pooled(per_set: dict, generated: list[np.ndarray], real: list[np.ndarray], reference: FeatureStats | None
            ) -> dict:
    """Scores over all sets together: means weighted by set size, FID on the pooled features."""
    counts = np.array([scores["n"] for scores in per_set.values()])
    pooled = {"n": int(counts.sum())}
    for key in ("clip_score", "clip_score_real", "correct", "colour", "shape", "position", "extra", "strict_correct",
                "strict_shape"):
        if all(key in scores for scores in per_set.values()):
            pooled[key] = float(np.average([scores[key] for scores in per_set.values()], weights=counts))
    if reference is not None:
        pooled["fid"] = frechet_distance(feature_stats(np.concatenate(generated)), reference)
        if real and len(real) == len(generated):
            pooled["fid_real"] = frechet_distance(feature_stats(np.concatenate(real)), reference)
    return pooled


# -- Markdown ----------------------------------------------------------------------------------

COLUMNS = [("n", "n", "{:d}"), ("correct", "correct", "{:.1%}"), ("strict_correct", "correct (strict)", "{:.1%}"),
           ("colour", "colour", "{:.1%}"),
           ("shape", "shape", "{:.1%}"), ("position", "position", "{:.1%}"),
           ("clip_score", "CLIP score", "{:.2f}"), ("clip_score_real", "CLIP score (real)", "{:.2f}"),
           ("fid", "FID", "{:.2f}"), ("fid_real", "FID (real)", "{:.2f}")]


def _cell(value, form: str, interval: list[float] | None = None) -> str:
    """A table cell; a fraction with its 95 % interval reads "97.0 % (93.6-98.6)"."""
    if value is None:
        return ""
    text = form.format(value).replace("%", " %")
    return text + f" ({100 * interval[0]:.1f}-{100 * interval[1]:.1f})" if interval else text


def markdown(report: dict) -> str:
    """The report as a Markdown table, a row per prompt set and one for all together."""
    rows = dict(report["sets"])
    if "all" in report:
        rows["all"] = report["all"]
    columns = [c for c in COLUMNS if any(c[0] in scores for scores in rows.values())]
    settings = report["settings"]
    lora = f" with the fast LoRA `{report['fast_lora']}`" if report.get("fast_lora") else ""
    lines = [f"Model `{report.get('model', '?')}`{lora}, {settings['scheduler']}, "
             f"{steps_text(settings['num_inference_steps'])}, "
             f"guidance {settings['guidance_scale']}"
             + (f", CLIP guidance {settings['clip_guidance_scale']:g}" if settings.get("clip_guidance_scale") else "")
             + f", seeds {report['seeds']}. "
             f"FID features: `{report['features']}`; CLIP score: `{report['clip']}`."
             + (" In brackets: 95 % intervals (Wilson) of the fractions." if any("interval_95" in s for s in rows.values())
                else ""), "",
             "| prompts | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, scores in rows.items():
        bounds = scores.get("interval_95", {})
        lines.append(f"| {name} | " + " | ".join(_cell(scores.get(key), form, bounds.get(key))
                                                 for key, _, form in columns) + " |")
    for name, scores in rows.items():
        if "strict_by_pair" in scores:
            groups = scores["strict_by_pair"].items()
            lines.append(f"\nStrict by pair and size, {name}: "
                         + ", ".join(f"{key} {_cell(g['strict'], '{:.0%}')} ({g['n']})" for key, g in groups) + ".")
    return "\n".join(lines) + "\n"


# -- sweeps ------------------------------------------------------------------------------------

SWEEP_STEPS = (10, 20, 50)
SWEEP_SCHEDULERS = ("ddim", "euler", "dpm++")
SWEEP_GUIDANCE = (2.0, 4.0, 7.5)


def sweep(pipe, sets: list[PromptSet], seeds: list[int], clip: Clip, extractor,
          references: dict[str, FeatureStats] | None,
          steps=SWEEP_STEPS, schedulers=SWEEP_SCHEDULERS, guidance=SWEEP_GUIDANCE, batch_size: int = 25,
          progress=print, clip_guidance=(0.0,), prompt_composition: bool = False) -> list[dict]:
    """`evaluate` for every (scheduler, steps, guidance, CLIP guidance); the pipeline's own scheduler is
    restored after. CLIP guidance steers with `clip`, the CLIP that also scores: read its CLIP score
    as optimised, not measured (the judge and FID are independent of it)."""
    original, reports = pipe.scheduler, []
    real = real_scores(sets, clip, extractor, references)
    try:
        for scheduler, count, scale, clip_scale in itertools.product(schedulers, steps, guidance, clip_guidance):
            pipe.set_scheduler(scheduler)
            report = evaluate(pipe, sets, seeds, clip, extractor, references, batch_size, real,
                              num_inference_steps=count, guidance_scale=scale, clip_guidance_scale=clip_scale,
                              clip_model=clip, prompt_composition=prompt_composition)
            report.pop("images")
            reports.append(report)
            if progress:
                progress(sweep_row(report))
    finally:
        pipe.scheduler = original
    return reports


def _summary(report: dict) -> dict:
    return report.get("all") or next(iter(report["sets"].values()))


def sweep_row(report: dict) -> str:
    """One Markdown row of a sweep table."""
    settings, scores = report["settings"], _summary(report)
    cells = [settings["scheduler"], str(settings["num_inference_steps"]), f"{settings['guidance_scale']:g}",
             f"{settings.get('clip_guidance_scale', 0.0):g}"]
    cells += [_cell(scores.get("correct"), "{:.1%}"), _cell(scores.get("strict_correct"), "{:.1%}"),
              *(_cell(report["sets"].get(kind, {}).get("correct"), "{:.1%}") for kind in KINDS),
              _cell(scores.get("clip_score"), "{:.2f}"), _cell(scores.get("fid"), "{:.2f}"),
              f"{report['timing']['seconds_per_image']:.3f}"]
    return "| " + " | ".join(cells) + " |"


def sweep_markdown(reports: list[dict]) -> str:
    """A sweep as a Markdown table, a row per setting."""
    kinds = " | ".join(KIND_TITLES.get(kind, kind) for kind in KINDS)
    header = (f"| scheduler | steps | guidance | CLIP guidance | correct | strict | {kinds} | CLIP score | FID "
              "| s/image |\n|---|---:|---:|---:|---:|---:|" + "---:|" * len(KINDS) + "---:|---:|---:|\n")
    return header + "\n".join(sweep_row(report) for report in reports) + "\n"


def plot_sweep(reports: list[dict], path: str | Path) -> Path:
    """Draw quality against steps: a row per measure, a column per guidance scale, a line per scheduler.

    The real images' FID and CLIP score at the same sample size are drawn as grey lines for scale.
    """
    from matplotlib.figure import Figure  # not pyplot: leave the caller's (a notebook's) backend alone

    metrics = [(key, title) for key, title in (("correct", "prompt accuracy"), ("fid", "FID (lower is better)"),
                                               ("clip_score", "CLIP score")) if key in _summary(reports[0])]
    schedulers = list(dict.fromkeys(r["settings"]["scheduler"] for r in reports))
    scales = sorted({r["settings"]["guidance_scale"] for r in reports})
    figure = Figure(figsize=(3.6 * len(scales), 2.6 * len(metrics)))
    axes = figure.subplots(len(metrics), len(scales), squeeze=False, sharex=True, sharey="row")
    for (row, (key, title)), (col, scale) in itertools.product(enumerate(metrics), enumerate(scales)):
        ax = axes[row][col]
        for i, scheduler in enumerate(schedulers):
            chosen = [r for r in reports
                      if r["settings"]["scheduler"] == scheduler and r["settings"]["guidance_scale"] == scale]
            points = sorted((r["settings"]["num_inference_steps"], _summary(r)[key]) for r in chosen)
            if points:
                ax.plot(*zip(*points), marker="os^Dv"[i % 5], markersize=8 - 1.5 * i, color=f"C{i}", label=scheduler)
        real = [_summary(r)[f"{key}_real"] for r in reports if f"{key}_real" in _summary(r)]
        if real:  # the same real images in every report
            ax.axhline(real[0], color="grey", linestyle=":", label="real images")
        ax.grid(alpha=0.3)
        if row == 0:
            ax.set_title(f"guidance {scale:g}")
        if col == 0:
            ax.set_ylabel(title)
        if row == len(metrics) - 1:
            ax.set_xlabel("denoising steps")
    axes[-1][-1].legend(fontsize=8)
    figure.suptitle(f"features: {reports[0]['features']}, n = {_summary(reports[0])['n']}", fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path

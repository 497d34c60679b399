"""Two reports of the same prompts and seeds, compared image by image.

Two models drawn from the same prompts and seeds make paired samples: where both are right or
both wrong on an image, it says nothing about which is better. What counts are the images that
only one of them gets right. Under "no difference" each such image is as likely to favour one
report as the other, so the exact McNemar test is a binomial test on them, with p = 1/2.
This is much tighter than comparing two fractions with their own intervals: two models at
94 and 95 % of 200 images may differ on six images or on thirty.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .accuracy import INTERVAL_KEYS

TITLES = {"correct": "correct", "strict_correct": "correct (strict)"}


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the chance of a split at least this uneven of the
    `only_a + only_b` images that one report gets right and the other wrong, were both equally good."""
    m, k = only_a + only_b, min(only_a, only_b)
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
    return min(1.0, 2 * tail)


def read_report(path: str | Path) -> dict:
    """An `ldm eval` report (JSON), checked to hold per-image verdicts."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"`report`: got {str(path)!r}; expected the JSON file `ldm eval --out` wrote")
    report = json.loads(path.read_text())
    if not isinstance(report, dict) or "sets" not in report:
        raise ValueError(f"`report`: {str(path)!r} is not one `ldm eval` report (a sweep's list of reports "
                         "cannot be compared)")
    if not any("verdicts" in scores for scores in report["sets"].values()):
        raise ValueError(f"`report`: {str(path)!r} holds no per-image verdicts (reports written before they "
                         "were recorded, or of a prompt file, which is not judged); run `ldm eval` again")
    return report


def compare(a: dict, b: dict) -> list[dict]:
    """For each judged set in both reports, and each of "correct" and "strict_correct": both fractions,
    how many images only `a` and only `b` get right, and the exact McNemar p-value.

    Raises:
        ValueError: if the reports were not drawn from the same seeds, or a set's prompts differ.
    """
    if a.get("seeds") != b.get("seeds"):
        raise ValueError(f"`reports`: drawn from seeds {a.get('seeds')!r} and {b.get('seeds')!r}; a paired "
                         "comparison needs the same seeds (`ldm eval --seeds`)")
    rows = []
    for name, scores_a in a["sets"].items():
        scores_b = b["sets"].get(name)
        if scores_b is None or "verdicts" not in scores_a or "verdicts" not in scores_b:
            continue
        if scores_a.get("prompts_digest") != scores_b.get("prompts_digest"):
            raise ValueError(f"`reports`: set {name!r} has other prompts in each report; a paired comparison "
                             "needs the same prompts (`ldm eval --n`, `--prompt-seed`, `--exclude-training`)")
        for key in INTERVAL_KEYS:
            right_a, right_b = scores_a["verdicts"][key], scores_b["verdicts"][key]
            only_a = sum(x == "1" and y == "0" for x, y in zip(right_a, right_b, strict=True))
            only_b = sum(x == "0" and y == "1" for x, y in zip(right_a, right_b, strict=True))
            rows.append({"set": name, "measure": key, "n": len(right_a), "a": right_a.count("1") / len(right_a),
                         "b": right_b.count("1") / len(right_b), "only_a": only_a, "only_b": only_b,
                         "p": mcnemar_p(only_a, only_b)})
    if not rows:
        raise ValueError(f"`reports`: no judged set in both (sets {sorted(a['sets'])} and {sorted(b['sets'])})")
    return rows


def markdown(rows: list[dict], name_a: str = "A", name_b: str = "B") -> str:
    """The comparison as a Markdown table."""
    lines = [f"A: {name_a}; B: {name_b}. Paired by image (same prompts and seeds); p: exact McNemar test, "
             "two-sided, on the images only one of the two gets right.", "",
             "| set | measure | n | A | B | only A right | only B right | p |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['set']} | {TITLES[row['measure']]} | {row['n']} | {100 * row['a']:.1f} % | "
                     f"{100 * row['b']:.1f} % | {row['only_a']} | {row['only_b']} | {row['p']:.3g} |")
    return "\n".join(lines) + "\n"

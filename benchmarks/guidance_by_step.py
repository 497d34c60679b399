"""Classifier-free guidance that changes with the timestep, measured with `ldm eval` (an experiment, not a
pipeline option).

    python benchmarks/guidance_by_step.py 3 500 1.5 --out runs/by-step.json [ldm eval arguments ...]

draws with guidance HIGH at the steps whose timestep (out of the training schedule's 1000) is at or
above SPLIT and LOW below it, and scores the bundled model as `ldm eval` does (default here:
`--n 200 --kinds seen held_out two`). docs/results/sweep-guidance-by-step-2026-12-02.{json,md}
holds what it measured: late-step guidance decides the strict shape measure, early-step guidance
hardly matters.
"""

from __future__ import annotations

import argparse
import sys

from ldm_pipeline.apps import cli
from ldm_pipeline.guidance import base


def guidance_by_split(high: float, split: float, low: float):
    """A `ClassifierFree.__call__` whose scale is `high` at timesteps >= `split` and `low` below."""

    def call(self, prediction, outputs, state):
        scale = high if float(state.timestep) >= split else low
        return base.guide(outputs[0], prediction, scale)

    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("high", type=float)
    parser.add_argument("split", type=float)
    parser.add_argument("low", type=float)
    args, rest = parser.parse_known_args()
    # every guided call in this process (the stored guidance scale is ignored)
    base.ClassifierFree.__call__ = guidance_by_split(args.high, args.split, args.low)
    defaults = [] if "--n" in rest else ["--n", "200"]
    defaults += [] if "--kinds" in rest else ["--kinds", "seen", "held_out", "two"]
    return cli.main(["eval", *defaults, *rest])


if __name__ == "__main__":
    sys.exit(main())

"""Does a learned word draw what it was taught? For the `<round>` embedding of
configs/shapes/textual_inversion_circle.json (a new word for circle, started from 'triangle'):

    ldm shapes-data circle --n 500 --mix 0 --out data/circles
    ldm train configs/shapes/textual_inversion_circle.json --data data/circles --run-dir runs/ti-circle
    python benchmarks/textual_inversion_word.py runs/ti-circle/ti/embedding

16 prompts (8 colours x 2 corners), seed 0, the model's defaults, judged (and strictly judged) as circles:
the plain word "circle", the initializer "triangle" (what the token starts as), and the learned token.
"""

from __future__ import annotations

import argparse

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.evaluation.judge import judge
from ldm_pipeline.evaluation.strict import strict_judge

COLOURS = ("red", "blue", "green", "yellow", "purple", "white", "black", "orange")
CORNERS = ("top left", "bottom right")


def prompts_for(word: str) -> list[str]:
    return [f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {word} in the {corner}"
            for colour in COLOURS for corner in CORNERS]


def circles(pipe, word: str, shape: str) -> tuple[int, int]:
    """How many of the prompts with `word` draw what the same prompts with `shape` ask for (judge, strict)."""
    images = pipe(prompts_for(word), seed=0, progress=False).images
    truths = prompts_for(shape)
    return (sum(judge(i, t).correct for i, t in zip(images, truths)),
            sum(strict_judge(i, t).correct for i, t in zip(images, truths)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("embedding", help="the trained embedding folder (RUN/ti/embedding)")
    parser.add_argument("--token", default="<round>")
    parser.add_argument("--shape", default="circle", help="the shape the word was taught")
    parser.add_argument("--initializer", default="triangle")
    args = parser.parse_args()
    pipe = LatentDiffusionPipeline.from_pretrained()
    n = len(COLOURS) * len(CORNERS)
    for label, word in ((f"plain {args.shape!r}", args.shape), (f"initializer {args.initializer!r}", args.initializer)):
        print(f"{label:>28}: %d / {n} judged, %d / {n} strict" % circles(pipe, word, args.shape))
    pipe.load_textual_inversion(args.embedding)
    print(f"{'learned ' + args.token:>28}: %d / {n} judged, %d / {n} strict" % circles(pipe, args.token, args.shape))


if __name__ == "__main__":
    main()

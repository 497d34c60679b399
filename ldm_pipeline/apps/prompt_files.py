"""A prompt file rendered into a folder, resumably, split across processes with accelerate.

`ldm generate --prompts FILE --out DIR` reads one job per line: a plain prompt, or a JSON
object with `prompt` and optionally `seed`, `negative_prompt`, `steps`, `prompt_composition`
(read AND as composed parts; default: `--prompt-composition`), `regions` (a box or null per
AND part, as `pipe(..., regions=)`), `image` (a picture to start from) with `strength`, and `mask` (a
mask of that picture to inpaint; paths are read relative to the prompt file). Job n (its line
number, from 1) is written to `DIR/<n, six digits>-<seed>.png` with its recipe, atomically, so
a finished file is always whole and a rerun skips it. Under `accelerate launch` every process
lists what is left, then takes its share with `PartialState().split_between_processes`; each
image depends only on its own seed and settings, so the files are the bytes one process would
write. `DIR/manifest.jsonl` (one line per finished image, in file order) is written at the end
by the main process, from the job list, so it too is the same however the work was split.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..guidance.composition import check_regions
from ..files import atomic_path
from ..provenance.png import write_png
from ..runtime.checks import is_int

MANIFEST = "manifest.jsonl"
JOB_KEYS = {"prompt", "seed", "negative_prompt", "steps", "prompt_composition", "regions", "image", "strength",
            "mask"}


@dataclass(frozen=True)
class Job:
    """One image of a prompt file."""

    line: int  # the line number in the file, from 1
    prompt: str
    seed: int  # from the line, or the base seed plus the line number
    negative_prompt: str | None = None
    steps: int | None = None  # None: the pipeline's default
    prompt_composition: bool = False
    regions: list | None = None  # a (left, top, right, bottom) box or None per AND part
    image: str | None = None  # image-to-image or inpainting: the picture's file
    strength: float | None = None  # None: the pipeline's default
    mask: str | None = None  # inpainting: the mask's file

    @property
    def file_name(self) -> str:
        return f"{self.line:06d}-{self.seed}.png"


def read_prompt_file(path: str | os.PathLike, base_seed: int = 0, steps: int | None = None,
                     negative_prompt: str | None = None, prompt_composition: bool = False) -> list[Job]:
    """The jobs of a prompt file: a prompt per line, or JSON lines; blank lines and `#` comments are skipped.

    Args:
        base_seed: a line with no seed of its own gets `base_seed + its line number`.
        steps, negative_prompt, prompt_composition: for lines that do not give their own.

    Raises:
        ValueError naming the line, for a line that is not a valid job, before any model loads.
    """
    path = Path(path)
    if steps is not None and (not is_int(steps) or steps < 1):
        raise ValueError(f"`--steps`: got {steps!r}; expected an integer >= 1")
    if not path.is_file():
        raise ValueError(f"`--prompts`: {str(path)!r} is not a file; expected a text file, a prompt per line, "
                         "or JSON lines")
    jobs = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        where = f"`--prompts`: {path.name} line {number}"
        if not text.startswith("{"):
            jobs.append(Job(number, text, base_seed + number, negative_prompt, steps, prompt_composition))
            continue
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error.msg})") from error
        unknown = set(entry) - JOB_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected {sorted(JOB_KEYS)}")
        if not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise ValueError(f"{where}: \"prompt\" must be a non-empty string, got {entry.get('prompt')!r}")
        seed = entry.get("seed", base_seed + number)
        if not is_int(seed) or not 0 <= seed < 2**63:
            raise ValueError(f"{where}: \"seed\" must be an integer in [0, 2**63), got {seed!r}")
        line_steps = entry.get("steps", steps)
        if line_steps is not None and (not is_int(line_steps) or line_steps < 1):
            raise ValueError(f"{where}: \"steps\" must be an integer >= 1, got {line_steps!r}")
        negative = entry.get("negative_prompt", negative_prompt)
        if negative is not None and not isinstance(negative, str):
            raise ValueError(f"{where}: \"negative_prompt\" must be a string, got {negative!r}")
        composed = entry.get("prompt_composition", prompt_composition)
        if not isinstance(composed, bool):
            raise ValueError(f"{where}: \"prompt_composition\" must be true or false, got {composed!r}")
        regions = entry.get("regions")
        if regions is not None:
            try:
                check_regions(regions, entry["prompt"], [entry["prompt"]], composed)
            except (TypeError, ValueError) as error:
                raise ValueError(f"{where}: {error}") from None
        jobs.append(Job(number, entry["prompt"], seed, negative, line_steps, composed, regions,
                        **_pictures(entry, path.parent, where)))
    if not jobs:
        raise ValueError(f"`--prompts`: {str(path)!r} holds no prompt")
    return jobs


def _pictures(entry: dict, folder: Path, where: str) -> dict:
    """A line's `image`, `strength` and `mask`, checked: files that exist (relative to the prompt file)."""
    found = {}
    for key in ("image", "mask"):
        if entry.get(key) is None:
            continue
        if not isinstance(entry[key], str):
            raise ValueError(f"{where}: \"{key}\" must be a file name, got {entry[key]!r}")
        file = (folder / entry[key]).resolve()
        if not file.is_file():
            raise ValueError(f"{where}: \"{key}\" {entry[key]!r} is not a file (read relative to the prompt file)")
        found[key] = str(file)
    if "mask" in found and "image" not in found:
        raise ValueError(f"{where}: \"mask\" needs an \"image\", the picture to repaint")
    strength = entry.get("strength")
    if strength is not None:
        if "image" not in found or not isinstance(strength, (int, float)) or isinstance(strength, bool) \
                or not 0 < strength <= 1:
            raise ValueError(f"{where}: \"strength\" must be a number in (0, 1] with an \"image\", got {strength!r}")
        found["strength"] = float(strength)
    return found


def render(pipe, jobs: list[Job], out_dir: str | os.PathLike, progress: bool = True, **call_kwargs) -> list[Path]:
    """Draw every job not yet in `out_dir`, this process's share of them under accelerate; write the manifest.

    Args:
        call_kwargs: passed to every `pipe(...)` call (guidance_scale, height, width, ...).

    Returns:
        The files this process wrote.
    """
    from accelerate import PartialState

    # on the CPU, processes started by accelerate launch (or torchrun) talk through gloo; accelerate
    # only chooses that when told the work is on the CPU
    state = PartialState(cpu=pipe.device.type == "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs if not (out / job.file_name).is_file()]
    state.wait_for_everyone()  # every process has listed the folder before anyone writes into it
    written = []
    with state.split_between_processes(todo) as mine:
        bar = tqdm(mine, desc="images" if state.num_processes == 1 else f"images, process {state.process_index}",
                   disable=not progress, position=state.process_index)
        for job in bar:
            pictures = {k: v for k, v in (("image", job.image), ("mask_image", job.mask), ("strength", job.strength))
                        if v is not None}
            result = pipe(job.prompt, negative_prompt=job.negative_prompt, num_inference_steps=job.steps,
                          seed=job.seed, prompt_composition=job.prompt_composition, regions=job.regions,
                          progress=False, **pictures, **call_kwargs)
            written.append(write_png(result.images[0], out / job.file_name, result.recipes()))
    state.wait_for_everyone()
    if state.is_main_process:
        write_manifest(out, jobs)
    state.wait_for_everyone()
    return written


def write_manifest(out: Path, jobs: list[Job]) -> Path:
    """`manifest.jsonl`: a line per finished image (its file and job), in file order; written atomically."""
    lines = [json.dumps({"file": job.file_name, **asdict(job)}, ensure_ascii=False)
             for job in jobs if (out / job.file_name).is_file()]
    target = out / MANIFEST
    with atomic_path(target) as temporary:
        temporary.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return target

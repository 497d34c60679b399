"""ldm generate --prompts FILE --out DIR: a prompt file into a folder, resumable, split across processes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_pipeline.apps.prompt_files import MANIFEST, read_prompt_file
from ldm_pipeline.apps.cli import main
from ldm_pipeline.provenance.png import read_recipe

PROMPTS = """a cat
# a comment, and a blank line, are skipped

{"prompt": "a dog", "seed": 42, "negative_prompt": "blurry", "steps": 3}
a house by the sea
{"prompt": "a red circle", "steps": 1}
a small blue square
"""


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if not p.name.startswith(".")}


def _generate(model, prompt_file, out, *extra):
    return main(["generate", "--prompts", str(prompt_file), "--model", str(model), "--steps", "2", "--size", "16x16",
                 "--seed", "100", "--out", str(out), *extra])


def test_prompt_file_lines_become_jobs(prompt_file):
    jobs = read_prompt_file(prompt_file, base_seed=100, steps=2)
    assert [(j.line, j.prompt, j.seed, j.negative_prompt, j.steps) for j in jobs] == [
        (1, "a cat", 101, None, 2), (4, "a dog", 42, "blurry", 3), (5, "a house by the sea", 105, None, 2),
        (6, "a red circle", 106, None, 1), (7, "a small blue square", 107, None, 2)]
    assert jobs[1].file_name == "000004-42.png"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a cat", "sed": 1}', r"line 2: unknown keys \['sed'\]"),
    ('{"prompt": ""}', r"line 2: \"prompt\" must be a non-empty string"),
    ('{"prompt": "a cat", "seed": -1}', r"line 2: \"seed\" must be an integer"),
    ('{"prompt": "a cat", "steps": 0}', r"line 2: \"steps\" must be an integer >= 1"),
    ('{"prompt": "a cat"', r"line 2: not valid JSON"),
    ('{"prompt": "a cat", "prompt_composition": "yes"}', r"line 2: \"prompt_composition\" must be true or false"),
    ('{"prompt": "a cat AND a dog", "regions": [null, null]}', r"line 2: `regions`: .*prompt_composition=True"),
    ('{"prompt": "a cat AND a dog", "prompt_composition": true, "regions": [[0, 0, 1, 1]]}',
     r"line 2: `regions`: prompt 0 has 2 part\(s\)"),
    ('{"prompt": "a cat", "prompt_composition": true, "regions": [[0, 0, 2, 1]]}', r"line 2: `regions`: .*part 0"),
])
def test_a_bad_line_is_named_before_any_model_loads(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("a fine prompt\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_prompt_file(path)


def test_a_folder_is_rendered_with_recipes_a_manifest_and_resumed(model, prompt_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert _generate(model, prompt_file, out) == 0
    files = _files(out)
    assert sorted(files) == ["000001-101.png", "000004-42.png", "000005-105.png", "000006-106.png",
                             "000007-107.png", MANIFEST]
    recipe = read_recipe(out / "000004-42.png")
    assert (recipe.prompt, recipe.negative_prompt, recipe.seed, recipe.num_inference_steps) == \
        ("a dog", "blurry", 42, 3)
    manifest = [json.loads(line) for line in files[MANIFEST].decode().splitlines()]
    assert [m["file"] for m in manifest] == sorted(n for n in files if n != MANIFEST)
    assert manifest[1] == {"file": "000004-42.png", "line": 4, "prompt": "a dog", "seed": 42,
                           "negative_prompt": "blurry", "steps": 3, "prompt_composition": False, "regions": None,
                           "image": None, "strength": None, "mask": None}
    assert "wrote 5 image(s)" in capsys.readouterr().out
    # a rerun draws nothing; one lost image is drawn again, the same bytes
    assert _generate(model, prompt_file, out) == 0 and "wrote 0 image(s)" in capsys.readouterr().out
    (out / "000005-105.png").unlink()
    assert _generate(model, prompt_file, out) == 0 and "wrote 1 image(s)" in capsys.readouterr().out
    assert _files(out) == files


def test_prompt_file_errors_exit_with_a_message(model, prompt_file, tmp_path, capsys):
    assert main(["generate", "a cat", "--prompts", str(prompt_file), "--out", str(tmp_path / "d")]) == 2
    assert "--prompts: the prompt file gives the prompts, an image each; drop prompt" in capsys.readouterr().err
    assert main(["generate", "--prompts", str(prompt_file), "--out", str(tmp_path / "x.png")]) == 2
    assert "with --prompts it is a folder" in capsys.readouterr().err
    assert main(["generate", "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "d")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_two_processes_under_accelerate_write_the_bytes_one_process_writes(model, prompt_file, tmp_path):
    single = tmp_path / "single"
    assert _generate(model, prompt_file, single) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    shared = tmp_path / "shared"
    run = subprocess.run(
        # `--multi_gpu` starts the processes (torchrun); on a machine without GPUs they draw on the CPU and meet
        # through gloo. (`--cpu --num_processes 2` starts one process unless MPI is set up.)
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ldm_pipeline", "generate",
         "--prompts", str(prompt_file), "--model", str(model), "--steps", "2", "--size", "16x16", "--seed", "100",
         "--out", str(shared)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # each process reports its share; the two write to one pipe, so their lines may run together
    reports = re.findall(r"wrote (\d+) image\(s\) into (.+?) \(5 in prompts\.txt; see manifest\.jsonl\)", run.stdout)
    assert sorted(reports) == [("2", str(shared)), ("3", str(shared))]  # 3 + 2 split
    assert _files(shared) == _files(single)


def test_composed_lines_with_regions_draw_what_the_pipeline_draws(model, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from ldm_pipeline import LatentDiffusionPipeline

    prompt = "a red circle in the top left AND a blue square in the bottom right"
    boxes = [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]]
    path = tmp_path / "composed.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "seed": 3, "regions": boxes}) + "\n" + prompt + "\n")
    jobs = read_prompt_file(path, prompt_composition=True)
    assert [(j.prompt_composition, j.regions) for j in jobs] == [(True, boxes), (True, None)]
    with pytest.raises(ValueError, match="line 1: `regions`: boxes belong to the parts of a composed prompt"):
        read_prompt_file(path)  # regions, but AND read as plain words
    out = tmp_path / "out"
    assert _generate(model, path, out, "--prompt-composition") == 0
    pipe = LatentDiffusionPipeline.from_pretrained(str(model))
    expected = pipe(prompt, seed=3, num_inference_steps=2, height=16, width=16, prompt_composition=True,
                    regions=boxes, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "000001-3.png").convert("RGB")), np.asarray(expected))
    recipe = read_recipe(out / "000001-3.png")
    assert recipe.prompt_composition and recipe.regions == boxes
    assert read_recipe(out / "000002-102.png").regions is None
    assert main(["generate", "--prompts", str(path), "--model", str(model), "--region", "all", "--out", str(out)]) == 2
    assert "drop --region" in capsys.readouterr().err


def test_lines_with_a_picture_and_a_mask_inpaint_it(model, tmp_path):
    import numpy as np
    from PIL import Image

    from ldm_pipeline import LatentDiffusionPipeline

    picture = Image.fromarray((np.random.RandomState(1).rand(16, 16, 3) * 255).astype(np.uint8))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (8, 8, 16, 16))
    (tmp_path / "pics").mkdir()
    picture.save(tmp_path / "pics" / "in.png")
    mask.save(tmp_path / "pics" / "mask.png")
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"prompt": "a cat", "seed": 4, "image": "pics/in.png", "mask": "pics/mask.png",
                                "strength": 0.9}) + "\n")
    job = read_prompt_file(path)[0]
    assert (job.image, job.mask, job.strength) == (str(tmp_path / "pics" / "in.png"),
                                                   str(tmp_path / "pics" / "mask.png"), 0.9)
    out = tmp_path / "out"
    assert _generate(model, path, out) == 0
    pipe = LatentDiffusionPipeline.from_pretrained(str(model))
    expected = pipe("a cat", image=picture, mask_image=mask, strength=0.9, seed=4, num_inference_steps=2,
                    progress=False).images[0]
    drawn = np.asarray(Image.open(out / "000001-4.png").convert("RGB"))
    np.testing.assert_array_equal(drawn, np.asarray(expected))
    assert read_recipe(out / "000001-4.png").mask_hash is not None
    for line, message in [({"prompt": "a cat", "mask": "pics/mask.png"}, r"\"mask\" needs an \"image\""),
                          ({"prompt": "a cat", "image": "pics/none.png"}, r"\"image\" 'pics/none.png' is not a file"),
                          ({"prompt": "a cat", "image": "pics/in.png", "strength": 2}, r"\"strength\" must be")]:
        path.write_text(json.dumps(line) + "\n")
        with pytest.raises(ValueError, match="line 1: " + message):
            read_prompt_file(path)

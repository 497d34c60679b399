"""The `ldm` command calls the public API and reports errors clearly."""

import os
import re
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from ldm_pipeline.apps.cli import main


def test_generate_writes_an_image(model, tmp_path, capsys):
    out = tmp_path / "out" / "cat.png"
    code = main(["generate", "a cat", "--model", str(model), "--steps", "3", "--seed", "5", "--size", "24x16",
                 "--scheduler", "euler", "--out", str(out)])
    assert code == 0
    with PIL.Image.open(out) as image:
        assert image.size == (24, 16)
    report = capsys.readouterr().out
    assert "seeds [5]" in report and "euler" in report and "3 steps" in report
    assert main(["generate", "a cat", "--model", str(model), "--steps", "1", "--size", "16x16", "--out", str(out)]) == 0
    assert " 1 step, " in capsys.readouterr().out


def test_image_to_image_and_grid(model, tmp_path):
    reference = tmp_path / "ref.png"
    PIL.Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(reference)
    out = tmp_path / "grid.png"
    assert main(["generate", "a cat", "--model", str(model), "--steps", "4", "--image", str(reference),
                 "--strength", "0.5", "--num-images", "2", "--out", str(out)]) == 0
    with PIL.Image.open(out) as grid:
        assert grid.size == (16 * 2 + 2, 16)


def test_bad_arguments_exit_with_a_message(model, tmp_path, capsys):
    assert main(["generate", "a cat", "--model", str(model), "--steps", "0", "--out", str(tmp_path / "x.png")]) == 2
    assert "`num_inference_steps`: got 0" in capsys.readouterr().err
    assert main(["generate", "a cat", "--model", str(model), "--out", str(tmp_path / "x.txt")]) == 2
    assert "--out: got" in capsys.readouterr().err
    assert main(["generate", "a cat", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_size_is_refused_by_the_parser(tmp_path):
    run = subprocess.run([sys.executable, "-m", "ldm_pipeline", "generate", "a cat", "--size", "big",
                          "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert run.returncode == 2 and "--size: got 'big'; expected WIDTHxHEIGHT" in run.stderr


def test_several_prompts_make_a_grid_with_a_row_each(model, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["generate", "a cat", "a red circle", "a photo of a cat", "--model", str(model), "--steps", "2",
                 "--num-images", "2", "--seed", "0", "--out", str(out)]) == 0
    with PIL.Image.open(out) as grid:
        assert grid.size == (2 * 16 + 2, 3 * 16 + 2 * 2)


@pytest.mark.parametrize("arguments, message", [
    (["missing.json"], r"`config`: no file 'missing.json'"),
    (["{recipe}", "--steps", "3"], r"--steps/--batch-size/--data: apply to one stage; pass a stage config"),
    (["{recipe}/vae.json", "--steps", "0"], r"`steps`: got 0; expected an integer >= 1"),
    (["{recipe}/unet.json", "--steps", "1"], r"`clip`: got '.*clip/model', which is not a folder; train the clip "
                                             r"stage first"),
], ids=["missing config", "steps for a recipe", "zero steps", "stage before its inputs"])
def test_ldm_train_errors_exit_with_status_2_and_one_line(tmp_path, arguments, message):
    recipe = str(Path(__file__).parents[1] / "configs" / "shapes")
    command = [sys.executable, "-m", "ldm_pipeline", "train", *[a.format(recipe=recipe) for a in arguments],
               "--run-dir", str(tmp_path / "run")]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm: error: "), run.stderr[-2000:]
    assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()  # the error came before any work

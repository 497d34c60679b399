"""Recipes in images: PNGs carry how they were drawn; reading them back draws the same pixels."""

import hashlib
import json

import numpy as np
import PIL.Image
import pytest
import torch

from ldm_pipeline import Recipe, read_recipe, read_recipes
from ldm_pipeline.apps.cli import main
from ldm_pipeline.provenance.infotext import parse_parameters
from ldm_pipeline.provenance.png import CHUNK, write_png

PROMPTS = ["a red circle in the top left", "a photo of a cat"]


def _pixels(image_or_path) -> np.ndarray:
    if isinstance(image_or_path, PIL.Image.Image):
        return np.asarray(image_or_path)
    with PIL.Image.open(image_or_path) as image:
        return np.asarray(image.convert("RGB"))


def _reference() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def test_one_image_round_trips_to_the_same_pixels(pipe, tmp_path):
    result = pipe(PROMPTS[0], negative_prompt="a blue square", num_inference_steps=4, guidance_scale=3.0, seed=11,
                  progress=False)
    [path] = result.save(tmp_path / "one.png")
    assert path == tmp_path / "one.png" and np.array_equal(_pixels(path), _pixels(result.images[0]))
    recipe = read_recipe(path)
    assert (recipe.prompt, recipe.negative_prompt, recipe.seed, recipe.num_inference_steps) == (
        PROMPTS[0], "a blue square", 11, 4)
    assert (recipe.guidance_scale, recipe.height, recipe.width, recipe.scheduler) == (3.0, 16, 16, "ddim")
    assert recipe.model_hash == pipe.model_hash() and recipe.strength is None and recipe.dtype == "float32"
    again = pipe.reproduce(path, progress=False)
    assert again.seeds == [11] and np.array_equal(_pixels(again.images[0]), _pixels(path))
    # and the recipe matters: another seed draws other pixels
    other = pipe(PROMPTS[0], negative_prompt="a blue square", num_inference_steps=4, guidance_scale=3.0, seed=12,
                 progress=False)
    assert not np.array_equal(_pixels(other.images[0]), _pixels(path))


def test_an_image_from_a_batch_is_drawn_again_alone_with_its_scheduler(pipe, tmp_path):
    pipe.set_scheduler("euler_a")  # stochastic: every step draws noise from the image's own generator
    result = pipe(PROMPTS, negative_prompt=["a blue square", ""], num_images_per_prompt=2, num_inference_steps=4,
                  guidance_scale=4.0, seed=[7, 3, 9, 1], progress=False)
    paths = result.save(tmp_path / "batch")
    assert [p.name for p in paths] == ["000-seed7.png", "001-seed3.png", "002-seed9.png", "003-seed1.png"]
    recipes = [read_recipe(p) for p in paths]
    assert [r.prompt for r in recipes] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert [r.negative_prompt for r in recipes] == ["a blue square"] * 2 + [""] * 2
    pipe.set_scheduler("ddim")  # the recipe, not the pipeline's present scheduler, decides
    for index in (1, 2):
        again = pipe.reproduce(paths[index], progress=False)
        assert len(again.images) == 1 and again.scheduler == "euler_a"
        assert np.array_equal(_pixels(again.images[0]), _pixels(result.images[index])), index
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # reproduce left the pipeline's own alone


def test_image_to_image_round_trip_needs_the_same_reference(pipe, tmp_path):
    reference = _reference()
    result = pipe(PROMPTS[1], image=reference, strength=0.6, num_inference_steps=5, num_images_per_prompt=2,
                  seed=4, progress=False)
    paths = result.save(tmp_path / "img2img")
    recipe = read_recipe(paths[1])
    assert recipe.strength == 0.6 and recipe.seed == 5 and recipe.image_hash and recipe.image_path is None
    with pytest.raises(ValueError, match=r"`image`: the recipe is image-to-image .* pass it with image="):
        pipe.reproduce(paths[1], progress=False)
    changed = reference.copy()
    changed[0, 0] ^= 1
    with pytest.raises(ValueError, match="`image`: this reference picture is not the one"):
        pipe.reproduce(paths[1], image=changed, progress=False)
    again = pipe.reproduce(paths[1], image=PIL.Image.fromarray(reference), progress=False)
    assert np.array_equal(_pixels(again.images[0]), _pixels(result.images[1]))
    # a reference given as a file is found again by its path
    PIL.Image.fromarray(reference).save(tmp_path / "ref.png")
    [path] = pipe(PROMPTS[1], image=tmp_path / "ref.png", strength=0.6, num_inference_steps=5, seed=5,
                  progress=False).save(tmp_path / "from-file.png")
    assert read_recipe(path).image_path == str(tmp_path / "ref.png")
    assert np.array_equal(_pixels(pipe.reproduce(path, progress=False).images[0]), _pixels(path))
    assert np.array_equal(_pixels(path), _pixels(result.images[1]))  # seed 5 alone = seed 5 of the batch


def test_a_third_party_reader_understands_the_parameters_chunk(pipe, tmp_path):
    from sd_parsers import ParserManager

    pipe.set_scheduler("euler_a")
    [path] = pipe("a cat, sitting: on a mat", negative_prompt="blurry", num_inference_steps=3, guidance_scale=5.5,
                  seed=123, progress=False).save(tmp_path / "cat.png")
    info = ParserManager().parse(str(path))
    [sampler] = info.samplers
    assert sampler.name == "Euler a"
    assert [str(p) for p in sampler.prompts] == ["a cat, sitting: on a mat"]
    assert [str(p) for p in sampler.negative_prompts] == ["blurry"]
    assert sampler.parameters["steps"] == "3" and sampler.parameters["seed"] == "123"
    assert sampler.parameters["cfg_scale"] == "5.5" and info.metadata["Size"] == "16x16"
    assert sampler.model.hash == pipe.model_hash()[:10]


def test_an_a1111_parameters_chunk_alone_is_read_and_drawn(pipe, tmp_path):
    text = ('a photo of a cat\nNegative prompt: a red circle\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, '
            'CFG scale: 6, Seed: 42, Size: 16x16, Model hash: 0123456789, Model: "my: model, v2", Version: v1.10')
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    PIL.Image.new("RGB", (16, 16)).save(tmp_path / "a1111.png", pnginfo=info)
    recipe = read_recipe(tmp_path / "a1111.png")
    assert (recipe.prompt, recipe.negative_prompt, recipe.num_inference_steps, recipe.seed) == (
        "a photo of a cat", "a red circle", 4, 42)
    assert (recipe.scheduler, recipe.guidance_scale, recipe.width, recipe.model, recipe.model_hash) == (
        "dpm++_karras", 6.0, 16, "my: model, v2", "0123456789")
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    with pytest.raises(ValueError, match=r"hash 0123456789, but this pipeline's model has hash"):
        pipe.reproduce(tmp_path / "a1111.png", progress=False)
    again = pipe.reproduce(tmp_path / "a1111.png", ignore_model_hash=True, progress=False)
    direct = pipe.set_scheduler("dpm++_karras")("a photo of a cat", negative_prompt="a red circle",
                                                 num_inference_steps=4, guidance_scale=6, seed=42, progress=False)
    assert np.array_equal(_pixels(again.images[0]), _pixels(direct.images[0]))
    # our own line reads back the same way
    [ours] = direct.save(tmp_path / "ours.png")
    with PIL.Image.open(ours) as image:
        parsed = parse_parameters(image.text["parameters"])
    assert (parsed["scheduler"], parsed["seed"], parsed["model_hash"]) == ("dpm++_karras", 42, pipe.model_hash()[:10])


def test_an_a1111_prompt_is_read_with_its_weights_and_and_parts(pipe, tmp_path):
    # A1111 reads (word:1.3) and AND in every prompt; a recipe read from its text draws them so
    prompt = "a (red:1.4) circle AND a [blue] square :0.5"
    info = PIL.PngImagePlugin.PngInfo()
    info.add_text("parameters", f"{prompt}\nNegative prompt: (blurry)\nSteps: 3, Sampler: DDIM, CFG scale: 5, "
                                "Seed: 7, Size: 16x16")
    PIL.Image.new("RGB", (16, 16)).save(tmp_path / "a1111.png", pnginfo=info)
    recipe = read_recipe(tmp_path / "a1111.png")
    assert (recipe.prompt, recipe.prompt_weighting, recipe.prompt_composition) == (prompt, True, True)
    again = pipe.reproduce(tmp_path / "a1111.png", ignore_model_hash=True, progress=False)
    settings = dict(negative_prompt="(blurry)", num_inference_steps=3, guidance_scale=5, seed=7, progress=False)
    direct = pipe.set_scheduler("ddim")(prompt, prompt_weighting=True, prompt_composition=True, **settings)
    literal = pipe(prompt, **settings)
    assert np.array_equal(_pixels(again.images[0]), _pixels(direct.images[0]))
    assert not np.array_equal(_pixels(again.images[0]), _pixels(literal.images[0]))
    plain = parse_parameters("a red circle\nSteps: 3, Seed: 1")  # no AND: one prompt, weights still read
    assert (plain["prompt_composition"], plain["prompt_weighting"]) == (False, True)


def test_a_changed_model_is_refused_unless_asked(pipe, tmp_path):
    [path] = pipe(PROMPTS[0], num_inference_steps=3, seed=0, progress=False).save(tmp_path / "x.png")
    before = pipe.model_hash()
    pipe.to(dtype=torch.float64)  # fp32 -> fp64 -> hashed as fp32: the same numbers, the same hash
    assert pipe.model_hash() == before
    pipe.to(dtype=torch.float32)
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(1e-3)
    assert pipe.model_hash() != before
    with pytest.raises(ValueError, match=r"`source`: the image was drawn by model None with hash .*, but this "
                                         r"pipeline's model has hash .*ignore_model_hash=True"):
        pipe.reproduce(path, progress=False)
    assert len(pipe.reproduce(path, ignore_model_hash=True, progress=False).images) == 1


def test_a_single_file_model_is_hashed_as_the_file(pipe, tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"stand-in for the checkpoint's bytes")
    pipe.identity.loaded_from_file(checkpoint, pipe)
    assert pipe.model_hash() == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert read_recipe(pipe("a cat", num_inference_steps=2, seed=0, progress=False).save(tmp_path / "a.png")[0]
                       ).model == "model"
    with torch.no_grad():
        next(pipe.vae.parameters()).mul_(2)  # no longer the file's weights
    assert len(pipe.model_hash()) == 32


def test_images_that_cannot_be_drawn_again_say_why(pipe, tmp_path):
    result = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), progress=False)
    [path] = result.save(tmp_path / "g.png")
    assert "generator=" in read_recipe(path).not_reproducible
    with pytest.raises(ValueError, match=r"cannot be drawn again: generator= was passed"):
        pipe.reproduce(path, progress=False)


def test_a_png_without_a_recipe_is_named(pipe, tmp_path, capsys):
    plain = tmp_path / "plain.png"
    PIL.Image.new("RGB", (16, 16)).save(plain)
    with pytest.raises(ValueError, match=r"`path`: '.*plain.png' carries no recipe"):
        read_recipe(plain)
    with pytest.raises(ValueError, match="carries no recipe"):
        pipe.reproduce(plain)
    with pytest.raises(ValueError, match=r"no file at '.*missing.png'"):
        read_recipe(tmp_path / "missing.png")
    assert main(["generate", "--from", str(plain), "--out", str(tmp_path / "x.png")]) == 2
    assert "plain.png' carries no recipe" in capsys.readouterr().err


def test_save_checks_its_path_and_writes_atomically(pipe, tmp_path, monkeypatch):
    result = pipe(["a cat", "a dog"], num_inference_steps=2, seed=0, progress=False)
    with pytest.raises(ValueError, match=r"output holds 2 images; give a folder"):
        result.save(tmp_path / "one.png")
    with pytest.raises(ValueError, match=r"expected a .png file name or a folder"):
        result.save(tmp_path / "one.jpg")
    target = tmp_path / "keep.png"
    target.write_bytes(b"the user's file")
    monkeypatch.setattr(PIL.Image.Image, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        pipe("a cat", num_inference_steps=2, seed=0, progress=False).save(target)
    assert target.read_bytes() == b"the user's file" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]


def test_ldm_generate_writes_recipes_and_from_draws_the_same_pixels(pipe, tmp_path, capsys):
    model = pipe.save_pretrained(tmp_path / "model")
    grid = tmp_path / "grid.png"
    assert main(["generate", *PROMPTS, "--model", str(model), "--steps", "3", "--num-images", "2", "--seed", "5",
                 "--scheduler", "euler", "--negative-prompt", "blurry", "--out", str(grid)]) == 0
    recipes, shape = read_recipes(grid)
    assert shape == (2, 2) and [r.seed for r in recipes] == [5, 6, 7, 8]
    assert [r.prompt for r in recipes] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert {r.scheduler for r in recipes} == {"euler"} and {r.model for r in recipes} == {"model"}
    with pytest.raises(ValueError, match=r"a grid of 4 images .*read_recipes"):
        read_recipe(grid)
    with PIL.Image.open(grid) as image:
        assert image.text["parameters"].startswith(PROMPTS[0]) and CHUNK in image.text
    again = tmp_path / "again.png"
    assert main(["generate", "--from", str(grid), "--model", str(model), "--out", str(again)]) == 0
    assert np.array_equal(_pixels(again), _pixels(grid))
    assert read_recipes(again)[0] == recipes
    one = tmp_path / "one.png"
    assert main(["generate", "a cat", "--model", str(model), "--steps", "2", "--seed", "1", "--out", str(one)]) == 0
    assert main(["generate", "--from", str(one), "--model", str(model), "--out", str(again)]) == 0
    assert np.array_equal(_pixels(again), _pixels(one))
    capsys.readouterr()
    assert main(["generate", "--from", str(one), "--seed", "3", "--out", str(again)]) == 2
    assert "--from: the recipe gives the settings; drop --seed" in capsys.readouterr().err
    write_png(PIL.Image.new("RGB", (16, 16)), tmp_path / "w.png", [Recipe(prompt="x", seed=1, model_hash="f" * 32)])
    assert main(["generate", "--from", str(tmp_path / "w.png"), "--model", str(model), "--out", str(again)]) == 2
    assert "but this pipeline's model has hash" in capsys.readouterr().err

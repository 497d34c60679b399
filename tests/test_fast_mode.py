"""Fast mode: `enable_fast` fuses a model's LCM-LoRA and takes its scheduler, steps and guidance; recipes say so."""

import copy
import json

import numpy as np
import pytest

from ldm_pipeline import LatentDiffusionPipeline, read_recipe
from test_lora import base_weights, make_lora

SIZE = dict(height=16, width=16)
FAST = {"scheduler": "lcm", "num_inference_steps": 2, "guidance_scale": 1.0}


@pytest.fixture
def fast_model(pipe, components, tmp_path):
    """The tiny model saved with a fast LoRA beside it, named in its ldm_pipeline.json as the bundled one is."""
    lora = make_lora(components, tmp_path / "tiny-lcm-lora", text_encoder=False, seed=3)
    (lora / "ldm_pipeline.json").write_text(json.dumps(FAST))
    folder = pipe.save_pretrained(tmp_path / "tiny")
    defaults = json.loads((folder / "ldm_pipeline.json").read_text()) if (folder / "ldm_pipeline.json").exists() else {}
    (folder / "ldm_pipeline.json").write_text(json.dumps({**defaults, "fast_lora": "../tiny-lcm-lora"}))
    return folder, lora


def draw(pipe, **kwargs):
    return np.asarray(pipe("a red circle", seed=0, progress=False, **SIZE, **kwargs).images[0], dtype=int)


def test_enable_fast_fuses_the_models_lora_and_takes_its_settings(fast_model):
    folder, lora = fast_model
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    assert pipe.defaults["fast_lora"] == str(lora.resolve())  # written relative to the model folder
    before, scheduler, defaults = draw(pipe), pipe.scheduler, dict(pipe.defaults)
    pipe.enable_fast()
    assert pipe.fast and type(pipe.scheduler).__name__ == "LCMScheduler"
    assert (pipe.defaults["num_inference_steps"], pipe.defaults["guidance_scale"]) == (2, 1.0)
    assert pipe.lora_info()[0]["fused"] and pipe.get_active_adapters() == ["fast"]
    output = pipe("a red circle", seed=0, progress=False, **SIZE)
    assert (output.steps_run, output.guidance_scale) == (2, 1.0)
    fast = np.asarray(output.images[0], dtype=int)

    by_hand = LatentDiffusionPipeline.from_pretrained(folder).set_scheduler("lcm")  # what the switch stands for
    by_hand.load_lora_weights(lora).fuse_lora()
    assert np.abs(draw(by_hand, num_inference_steps=2, guidance_scale=1.0) - fast).max() == 0
    assert np.abs(fast - draw(pipe.disable_fast())).max() > 10  # the LoRA and the schedule changed the picture

    assert not pipe.fast and pipe.scheduler is scheduler and pipe.defaults == defaults
    assert np.array_equal(draw(pipe), before)  # the exact weights are back
    pipe.enable_fast()  # on again: the adapter stays loaded, so this is a fuse
    assert np.array_equal(draw(pipe), fast)


def test_recipes_record_fast_mode_and_reproduce_switches_it(fast_model, tmp_path):
    folder, _ = fast_model
    pipe = LatentDiffusionPipeline.from_pretrained(folder)
    plain = pipe("a red circle", seed=1, progress=False, **SIZE)
    plain_path = plain.save(tmp_path / "plain.png")[0]
    pipe.enable_fast()
    fast = pipe("a red circle", seed=1, progress=False, **SIZE)
    fast_path = fast.save(tmp_path / "fast.png")[0]
    recipe = read_recipe(fast_path)
    assert recipe.fast and recipe.scheduler == "lcm" and [l["name"] for l in recipe.loras] == ["fast"]
    assert read_recipe(plain_path).fast is False
    pipe.disable_fast()

    again = pipe.reproduce(fast_path, progress=False).images[0]  # switched on for the recipe, then off
    assert np.array_equal(np.asarray(again), np.asarray(fast.images[0])) and not pipe.fast
    pipe.enable_fast()
    again = pipe.reproduce(plain_path, progress=False).images[0]  # switched off for the recipe, then on
    assert np.array_equal(np.asarray(again), np.asarray(plain.images[0])) and pipe.fast


def test_a_lora_without_settings_gets_lcm_advice_and_a_model_without_one_is_a_clear_error(pipe, components,
                                                                                            tmp_path):
    with pytest.raises(ValueError, match=r"`lora`: this model names no fast LoRA.*lcm-lora-sdv1-5"):
        pipe.enable_fast()
    lora = make_lora(components, tmp_path / "lcm", text_encoder=False)
    pipe.enable_fast(lora)
    assert (pipe.defaults["num_inference_steps"], pipe.defaults["guidance_scale"]) == (4, 1.0)
    with pytest.raises(ValueError, match="save_pretrained: fast mode is on.*disable_fast"):
        pipe.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    pipe.unload_lora_weights()  # takes the fast LoRA with it, weights as before
    assert not pipe.fast and pipe.lora_info() == [] and pipe.defaults["num_inference_steps"] == 50
    with pytest.raises(TypeError, match="`lora`: got int"):
        pipe.enable_fast(3)
    pipe.load_lora_weights(lora, adapter_name="fast")  # a name fast mode uses, taken by hand
    with pytest.raises(ValueError, match="`lora`: an adapter named 'fast' is loaded .by load_lora_weights."):
        pipe.enable_fast(lora)
    assert not pipe.fast and pipe.get_active_adapters() == ["fast"]  # nothing changed


def test_enable_fast_keeps_other_adapters_acting(pipe, components, tmp_path):
    style = make_lora(components, tmp_path / "style", seed=5)
    lcm = make_lora(components, tmp_path / "lcm", text_encoder=False, seed=6)
    pipe.load_lora_weights(style, adapter_name="style", scale=0.5)
    weights = base_weights(pipe)
    pipe.enable_fast(lcm)
    assert pipe.get_active_adapters() == ["style", "fast"]
    assert {l["name"]: (l["scale"], l["fused"]) for l in pipe.lora_info()} == {"style": (0.5, False),
                                                                                 "fast": (1.0, True)}
    pipe.disable_fast()
    assert pipe.get_active_adapters() == ["style"]
    after = base_weights(pipe)
    assert all(np.array_equal(after[key].numpy(), weights[key].numpy()) for key in weights)


def test_ldm_generate_fast(fast_model, tmp_path, capsys):
    from ldm_pipeline.apps.cli import main

    folder, _ = fast_model
    common = ["generate", "a red circle", "--model", str(folder), "--seed", "0", "--size", "16x16"]
    assert main([*common, "--fast", "--out", str(tmp_path / "fast.png")]) == 0
    recipe = read_recipe(tmp_path / "fast.png")
    assert recipe.fast and recipe.num_inference_steps == 2 and recipe.scheduler == "lcm" and recipe.guidance_scale == 1.0
    assert main([*common, "--fast", "--steps", "3", "--out", str(tmp_path / "three.png")]) == 0
    assert read_recipe(tmp_path / "three.png").num_inference_steps == 3  # a flag given wins over the LoRA's default
    assert main(["generate", "--from", str(tmp_path / "fast.png"), "--model", str(folder),
                 "--out", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(read_image(tmp_path / "again.png")), np.asarray(read_image(tmp_path / "fast.png")))
    assert main([*common, "--fast", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "--fast" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def read_image(path):
    from PIL import Image

    with Image.open(path) as image:
        return copy.copy(image.convert("RGB"))

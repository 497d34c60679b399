"""The hires fix: draw at the base size, upscale, refine; recorded, drawn again, refused when it cannot run."""

import numpy as np
import PIL.Image
import pytest
import torch

from ldm_pipeline import read_recipe
from ldm_pipeline.apps.cli import main
from ldm_pipeline.provenance import infotext

FAST = dict(num_inference_steps=4, progress=False)


def pixels(images):
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_the_hires_pass_draws_at_the_larger_size_and_the_recipe_draws_it_again(pipe):
    result = pipe("a red circle", seed=3, hires_fix=True, hires_strength=0.5, **FAST)
    assert result.images[0].size == (32, 32) and (result.height, result.width) == (32, 32)
    recipe = result.recipes()[0]
    assert (recipe.height, recipe.width, recipe.hires_fix, recipe.hires_scale, recipe.hires_strength) == \
        (16, 16, True, 2.0, 0.5)
    again = pipe.reproduce(result.recipes(), progress=False)
    assert np.array_equal(pixels(again.images), pixels(result.images))
    base = pipe("a red circle", seed=3, **FAST).images[0]
    plain = np.asarray(base.resize((32, 32), PIL.Image.BILINEAR), dtype=np.int16)
    assert np.abs(pixels(result.images)[0] - plain).mean() > 2  # refined, not only upscaled
    off = pipe("a red circle", seed=3, **FAST).recipes()[0]
    assert (off.hires_fix, off.hires_scale, off.hires_upscaler) == (False, None, None)


def test_each_image_of_a_batch_is_the_image_drawn_alone(pipe):
    batch = pipe(["a cat", "a dog"], seed=[5, 9], hires_fix=True, hires_scale=1.5, **FAST).images
    alone = pipe("a dog", seed=9, hires_fix=True, hires_scale=1.5, **FAST).images
    assert batch[0].size == (24, 24)
    assert np.abs(pixels(batch)[1] - pixels(alone)[0]).max() <= 1


def test_upscalers_latent_lanczos_and_a_model_of_ones_own(pipe):
    seen = []

    def double(picture):
        seen.append(picture.size)
        return picture.resize((picture.width * 2, picture.height * 2), PIL.Image.NEAREST)

    drawn = {name: pixels(pipe("a cat", seed=1, hires_fix=True, hires_upscaler=upscaler, hires_width=32,
                               hires_height=24, **FAST).images)[0]
             for name, upscaler in (("latent", "latent"), ("lanczos", "lanczos"), ("own", double))}
    assert seen == [(16, 16)] and drawn["own"].shape == (24, 32, 3)
    assert not np.array_equal(drawn["latent"], drawn["lanczos"]) and not np.array_equal(drawn["lanczos"], drawn["own"])


@pytest.mark.parametrize("arguments, message", [
    (dict(image=PIL.Image.new("RGB", (16, 16))), r"`hires_fix`: applies to text-to-image"),
    (dict(hires_scale=0.5), r"`hires_scale`: got 0.5"),
    (dict(hires_upscaler="bicubic"), r"`hires_upscaler`: got 'bicubic'"),
    (dict(hires_width=33), r"`hires_width`: got 33"),
    (dict(hires_steps=0), r"`hires_steps`: got 0"),
    (dict(hires_strength=0.1, hires_steps=4), r"`hires_strength`: 0.1 of 4 steps runs no step"),
])
def test_a_hires_fix_that_cannot_run_is_refused_before_any_model(pipe, arguments, message):
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=message):
        pipe("a cat", hires_fix=True, **{**FAST, **arguments})
    handle.remove()
    assert calls == []


def test_a_model_file_needs_spandrel(pipe, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_spandrel(name, *args, **kwargs):
        if name == "spandrel":
            raise ImportError("no spandrel here")
        return real_import(name, *args, **kwargs)

    (tmp_path / "4x.pth").write_bytes(b"not a model")
    monkeypatch.setattr(builtins, "__import__", no_spandrel)
    with pytest.raises(ImportError, match=r"`hires_upscaler`: upscaler model files are read with spandrel"):
        pipe("a cat", seed=0, hires_fix=True, hires_upscaler=str(tmp_path / "4x.pth"), **FAST)


def test_infotext_writes_and_reads_a1111s_hires_fields():
    text = ("a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.45, "
            "Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent, Hires resize: 1024x768")
    fields = infotext.parse_parameters(text)
    assert (fields["hires_fix"], fields["hires_scale"], fields["hires_steps"], fields["hires_strength"],
            fields["hires_upscaler"], fields["hires_width"], fields["hires_height"], fields["strength"]) == \
        (True, 2.0, 10, 0.45, "latent", 1024, 768, None)
    from ldm_pipeline import Recipe

    written = Recipe(**{k: v for k, v in fields.items() if k in Recipe.__dataclass_fields__}).parameters()
    for key in ("Hires upscale: 2", "Hires steps: 10", "Hires upscaler: Latent", "Denoising strength: 0.45",
                "Hires resize: 1024x768"):
        assert key in written


def test_ldm_generate_hires(model, tmp_path):
    assert main(["generate", "a cat", "--model", str(model), "--steps", "3", "--seed", "0", "--hires",
                 "--hires-scale", "1.5", "--hires-upscaler", "lanczos", "--out", str(tmp_path / "big.png")]) == 0
    assert PIL.Image.open(tmp_path / "big.png").size == (24, 24)
    recipe = read_recipe(tmp_path / "big.png")
    assert (recipe.hires_fix, recipe.hires_scale, recipe.hires_upscaler) == (True, 1.5, "lanczos")
    assert "Hires upscaler: Lanczos" in recipe.parameters()


def test_the_hires_pass_takes_controlnets_at_the_larger_size(components):
    import copy

    from diffusers import ControlNetModel

    from ldm_pipeline import LatentDiffusionPipeline

    torch.manual_seed(0)
    net = ControlNetModel.from_unet(components["unet"], conditioning_embedding_out_channels=(16, 32)).eval()
    with torch.no_grad():
        for block in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
            block.weight.normal_(0, 0.3)
    pipe = LatentDiffusionPipeline(**copy.deepcopy(components), controlnet=net)
    edges = PIL.Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8))
    steered = pipe("a cat", control_image=edges, seed=0, hires_fix=True, **FAST).images[0]
    plain = LatentDiffusionPipeline(**copy.deepcopy(components))("a cat", seed=0, hires_fix=True, **FAST).images[0]
    assert steered.size == (32, 32) and np.abs(pixels([steered]) - pixels([plain])).max() > 8

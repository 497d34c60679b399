"""Behaviour of LatentDiffusionPipeline on tiny offline components."""

import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.guidance.base import ClassifierFree
from ldm_pipeline.sampling.loop import denoise
from ldm_pipeline.sampling.schedulers import fresh_copy

FAST = dict(num_inference_steps=4, progress=False)


def test_default_call_returns_pil_images_and_records_what_was_used(pipe):
    result = pipe("a red circle", seed=3, **FAST)
    assert len(result.images) == 1 and isinstance(result.images[0], PIL.Image.Image)
    assert result.images[0].size == (16, 16) and result.images[0].mode == "RGB"
    assert result.seeds == [3]
    assert (result.height, result.width, result.num_inference_steps, result.steps_run) == (16, 16, 4, 4)
    assert result.scheduler == "ddim" and result.guidance_scale == 7.5 and result.strength is None


def test_same_seed_same_pixels_and_different_seed_differs(pipe):
    first = pipe("a cat", seed=5, output_type="np", **FAST).images
    again = pipe("a cat", seed=5, output_type="np", **FAST).images
    other = pipe("a cat", seed=6, output_type="np", **FAST).images
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 0.01


def test_random_seed_is_recorded_and_reproduces_the_image(pipe):
    result = pipe("a cat", output_type="np", **FAST)
    assert len(result.seeds) == 1
    again = pipe("a cat", seed=result.seeds[0], output_type="np", **FAST)
    assert np.array_equal(result.images, again.images)


def test_an_image_depends_only_on_its_seed_not_on_its_batch(pipe):
    batch = pipe(["a cat", "a red circle", "a cat"], seed=20, output_type="np", **FAST)
    assert batch.seeds == [20, 21, 22]
    alone = pipe("a red circle", seed=21, output_type="np", **FAST).images[0]
    assert np.abs(batch.images[1] - alone).max() <= 1 / 255
    per_prompt = pipe(["a cat", "a red circle"], num_images_per_prompt=2, seed=[9, 3, 21, 4], output_type="np",
                      **FAST).images
    assert np.abs(per_prompt[2] - alone).max() <= 1 / 255


def test_num_images_per_prompt_orders_images_prompt_by_prompt(pipe):
    result = pipe(["a cat", "a red circle"], num_images_per_prompt=2, seed=0, output_type="np", **FAST)
    assert result.images.shape == (4, 16, 16, 3)
    assert result.prompts == ["a cat", "a red circle"]
    second_prompt_alone = pipe("a red circle", seed=2, output_type="np", **FAST).images[0]
    assert np.abs(result.images[2] - second_prompt_alone).max() <= 1 / 255


def test_output_types_agree(pipe):
    kwargs = dict(prompt="a cat", seed=1, **FAST)
    pil = np.asarray(pipe(**kwargs).images[0])
    array = pipe(output_type="np", **kwargs).images
    tensor = pipe(output_type="pt", **kwargs).images
    latent = pipe(output_type="latent", **kwargs).images
    assert array.shape == (1, 16, 16, 3) and array.dtype == np.float32
    assert tensor.shape == (1, 3, 16, 16) and 0 <= tensor.min() and tensor.max() <= 1
    assert latent.shape == (1, 4, 8, 8)
    assert np.allclose(tensor.permute(0, 2, 3, 1).numpy(), array)
    assert np.abs(np.round(array[0] * 255) - pil).max() == 0


def test_guidance_one_equals_no_guidance(pipe):
    cond = pipe.encode_prompt(["a cat"])
    uncond = pipe.encode_prompt([""])
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(negative):
        scheduler = fresh_copy(pipe.scheduler)
        scheduler.set_timesteps(5)
        guidances = [ClassifierFree(negative, 1.0)] if negative is not None else []
        return denoise(pipe.unet, scheduler, start, scheduler.timesteps, cond, guidances, progress=False)[0]

    assert torch.allclose(run(uncond), run(None), atol=1e-5)


def test_guidance_at_or_below_one_skips_the_unconditional_pass(pipe, monkeypatch):
    batches = []
    forward = pipe.unet.forward

    def counted(sample, timestep, encoder_hidden_states, **kwargs):
        batches.append((sample.shape[0], encoder_hidden_states.shape[0]))
        return forward(sample, timestep, encoder_hidden_states, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", counted)
    images = {}
    for scale, unet_batch in ((0.0, 2), (0.5, 2), (1.0, 2), (1.5, 4), (8.0, 4)):
        batches.clear()
        images[scale] = pipe(["a cat", "a red circle"], guidance_scale=scale, seed=0, output_type="np", **FAST).images
        # one UNet call per step; with guidance it sees [uncond, cond] for the two images
        assert batches == [(unet_batch, unet_batch)] * 4, scale
    assert np.abs(images[1.0] - images[8.0]).max() > 0.01


def test_prompt_embeds_split_equals_the_whole(pipe):
    whole = pipe("a cat", negative_prompt="a dog", seed=2, output_type="np", **FAST).images
    split = pipe(prompt_embeds=pipe.encode_prompt("a cat"), negative_prompt_embeds=pipe.encode_prompt("a dog"),
                 seed=2, output_type="np", **FAST).images
    assert np.array_equal(whole, split)


def test_negative_prompt_changes_the_image(pipe):
    plain = pipe("a cat", seed=2, output_type="np", **FAST).images
    negative = pipe("a cat", negative_prompt="a red circle", seed=2, output_type="np", **FAST).images
    assert np.abs(plain - negative).max() > 0.01


def test_given_latents_are_used(pipe):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    first = pipe(["a cat"] * 2, latents=noise, output_type="np", **FAST).images
    seeded = pipe(["a cat"] * 2, latents=noise, seed=99, output_type="np", **FAST).images
    assert np.array_equal(first, seeded)  # DDIM with eta 0 uses no noise beyond the start


def test_callback_sees_every_step_and_can_stop(pipe):
    seen = []
    full = pipe("a cat", seed=0, callback=lambda step, t, latents: seen.append((step, int(t), latents.shape)), **FAST)
    assert [step for step, _, _ in seen] == [0, 1, 2, 3] and full.steps_run == 4
    assert seen[0][1] > seen[-1][1] and seen[0][2] == (1, 4, 8, 8)
    stopped = pipe("a cat", seed=0, callback=lambda step, t, latents: step < 1, output_type="np", **FAST)
    assert stopped.steps_run == 2
    assert np.abs(stopped.images - pipe("a cat", seed=0, output_type="np", **FAST).images).max() > 0.01


def test_progress_bar_shows_by_default_and_can_be_turned_off(pipe, capsys):
    pipe("a cat", seed=0, num_inference_steps=3)
    assert "3/3" in capsys.readouterr().err
    pipe("a cat", seed=0, num_inference_steps=3, progress=False)
    assert capsys.readouterr().err == ""


def test_components_and_scheduler_passed_in_are_never_changed(components):
    scheduler = components["scheduler"]
    state = dict(scheduler.config), scheduler.timesteps.clone()
    weights = {k: v.clone() for k, v in components["unet"].state_dict().items()}
    pipe = LatentDiffusionPipeline(**components)
    pipe("a cat", seed=0, num_inference_steps=3, progress=False)
    pipe("a cat", image=np.zeros((16, 16, 3), np.uint8), strength=0.5, seed=0, num_inference_steps=4,
         progress=False)
    pipe.set_scheduler("euler")
    assert pipe.scheduler is not scheduler
    assert dict(scheduler.config) == state[0] and torch.equal(scheduler.timesteps, state[1])
    assert all(torch.equal(weights[k], v) for k, v in components["unet"].state_dict().items())


def test_set_scheduler_keeps_the_model_config_and_changes_the_result(pipe):
    ddim = pipe("a cat", seed=0, output_type="np", **FAST)
    pipe.set_scheduler("euler")
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.steps_offset == 1
    euler = pipe("a cat", seed=0, output_type="np", **FAST)
    assert euler.scheduler == "euler"
    assert np.abs(ddim.images - euler.images).max() > 1e-4
    pipe.set_scheduler("dpm++_karras").set_scheduler("lms")
    assert not pipe.scheduler.config.use_karras_sigmas


def test_image_to_image_runs_strength_times_steps(pipe):
    reference = PIL.Image.new("RGB", (24, 16), (200, 30, 30))
    result = pipe("a cat", image=reference, strength=0.5, num_inference_steps=10, seed=0, output_type="np",
                  progress=False)
    assert result.steps_run == 5 and result.strength == 0.5
    assert result.images.shape == (1, 16, 24, 3)
    # in latent space, a low strength ends close to the reference and strength 1 far from it
    from ldm_pipeline.images import to_tensor
    target = pipe.vae.encode(to_tensor(reference, 16, 24)).latent_dist.mean * pipe.vae.config.scaling_factor
    distance = {}
    for strength in (0.1, 1.0):
        latents = pipe("a cat", image=reference, strength=strength, num_inference_steps=10, seed=0,
                       output_type="latent", progress=False).images
        distance[strength] = (latents - target).abs().mean().item()
    assert distance[0.1] < distance[1.0] / 2


def test_image_to_image_with_a_generator_per_image(pipe):
    reference = PIL.Image.fromarray((np.random.RandomState(2).rand(16, 16, 3) * 255).astype(np.uint8))
    kwargs = dict(image=reference, strength=0.75, num_images_per_prompt=2, output_type="np", **FAST)
    listed = pipe("a cat", generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **kwargs)
    assert listed.seeds is None and listed.steps_run == 3
    assert np.array_equal(listed.images, pipe("a cat", seed=[3, 4], **kwargs).images)
    # each image depends on its own generator only: the second alone is the same picture
    alone = pipe("a cat", generator=[torch.Generator().manual_seed(4)], **{**kwargs, "num_images_per_prompt": 1})
    assert np.abs(listed.images[1] - alone.images[0]).max() <= 1 / 255
    assert np.abs(listed.images[0] - listed.images[1]).max() > 0.01


def test_image_to_image_rounds_the_size_down_with_a_warning(pipe):
    reference = PIL.Image.fromarray((np.random.RandomState(3).rand(19, 25, 3) * 255).astype(np.uint8))
    with pytest.warns(UserWarning, match=r"`image` of size 25x19 is resized to 24x18, the nearest smaller multiple "
                                         r"of the VAE factor 2"):
        rounded = pipe("a cat", image=reference, strength=0.5, seed=0, output_type="np", **FAST)
    assert rounded.images.shape == (1, 18, 24, 3) and (rounded.height, rounded.width) == (18, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a size that is asked for is not rounded, and not warned about
        explicit = pipe("a cat", image=reference, strength=0.5, height=18, width=24, seed=0, output_type="np", **FAST)
    assert np.array_equal(rounded.images, explicit.images)


def test_strength_one_ignores_the_reference_where_the_schedule_ends_in_pure_noise(components):
    # The bundled model's schedule: zero terminal SNR, so the first of the trailing timesteps is pure noise.
    scheduler = DDIMScheduler.from_config(components["scheduler"].config, prediction_type="v_prediction",
                                          rescale_betas_zero_snr=True, timestep_spacing="trailing")
    pipe = LatentDiffusionPipeline(**{**components, "scheduler": scheduler})
    red = PIL.Image.new("RGB", (16, 16), (200, 30, 30))
    noise = PIL.Image.fromarray((np.random.RandomState(4).rand(16, 16, 3) * 255).astype(np.uint8))

    def draw(reference, strength):  # final latents: the tiny random VAE's decoder would blur the difference
        return pipe("a cat", image=reference, strength=strength, seed=0, output_type="latent", **FAST).images

    assert torch.equal(draw(red, 1.0), draw(noise, 1.0))
    assert (draw(red, 0.75) - draw(noise, 0.75)).abs().mean() > 1e-3  # below 1 the reference shows


@pytest.mark.parametrize("kind", ["RGBA", "L", "P", "I;16", "numpy", "tensor", "path"])
def test_image_to_image_accepts_every_kind_of_image(pipe, kind, tmp_path):
    rgb = PIL.Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8))
    images = {
        "RGBA": rgb.convert("RGBA"), "L": rgb.convert("L"), "P": rgb.convert("P"),
        "I;16": PIL.Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257)).convert("I;16"),
        "numpy": np.array(rgb), "tensor": torch.from_numpy(np.array(rgb)).permute(2, 0, 1) / 255.0,
    }
    if kind == "path":
        rgb.save(tmp_path / "reference.png")
        images["path"] = str(tmp_path / "reference.png")
    result = pipe("a cat", image=images[kind], strength=0.5, seed=0, output_type="np", **FAST)
    expected = pipe("a cat", image=rgb if kind in ("RGBA", "numpy", "tensor", "path") else rgb.convert("L"),
                    strength=0.5, seed=0, output_type="np", **FAST)
    tolerance = 0.05 if kind == "P" else 1e-6  # a palette image loses colours
    assert np.abs(result.images - expected.images).mean() < tolerance

"""Bad input gets a clear error naming the argument, the value and what is accepted, before any model runs."""

import numpy as np
import pytest
import torch

from ldm_pipeline.sampling.latents import decode_latents


# Every way the pipeline reaches a model's weights: `__call__` goes through `forward`, but the pipeline
# calls the VAE's `encode` and `decode` directly, and those do not.
ENTRIES = {"unet": ("forward",), "text_encoder": ("forward",), "vae": ("forward", "encode", "decode")}
# Given embeddings, no text encoder runs, so the VAE is the first model an image-to-image call reaches.
EMBEDS = dict(prompt_embeds=torch.zeros(1, 77, 32), negative_prompt_embeds=torch.zeros(1, 77, 32))


@pytest.fixture
def guarded(pipe, monkeypatch):
    """A pipeline whose models fail loudly if they run: errors must come before any heavy work."""
    def forbidden(entry):
        def run(*args, **kwargs):
            raise AssertionError(f"{entry} ran before the arguments were checked")
        return run

    for name, methods in ENTRIES.items():
        for method in methods:
            monkeypatch.setattr(getattr(pipe, name), method, forbidden(f"{name}.{method}"))
    return pipe


def test_the_guard_stops_every_model_entry_the_pipeline_uses(guarded):
    """Valid calls on the guarded pipeline hit the guard at the first model they reach."""
    with pytest.raises(AssertionError, match="text_encoder.forward ran"):
        guarded("a cat", progress=False)
    with pytest.raises(AssertionError, match="unet.forward ran"):
        guarded(**EMBEDS, progress=False)
    with pytest.raises(AssertionError, match="vae.encode ran"):
        guarded(**EMBEDS, image=np.zeros((16, 16, 3), np.uint8), progress=False)
    with pytest.raises(AssertionError, match="vae.decode ran"):
        decode_latents(guarded.vae, torch.zeros(1, 4, 8, 8))


CASES = [
    (dict(height=0), ValueError, r"`height`: got 0; expected a positive multiple of the VAE factor 2"),
    (dict(width=15), ValueError, r"`width`: got 15; expected a positive multiple"),
    (dict(height=-16), ValueError, r"`height`: got -16"),
    (dict(height=16.0), ValueError, r"`height`: got 16.0"),
    (dict(num_inference_steps=0), ValueError, r"`num_inference_steps`: got 0; expected an integer >= 1"),
    (dict(num_inference_steps=2.5), ValueError, r"`num_inference_steps`: got 2.5"),
    (dict(guidance_scale=-1), ValueError, r"`guidance_scale`: got -1; expected a number >= 0"),
    (dict(num_images_per_prompt=0), ValueError, r"`num_images_per_prompt`: got 0"),
    (dict(output_type="jpeg"), ValueError, r"`output_type`: got 'jpeg'; expected one of \['pil', 'np', 'pt', 'latent'\]"),
    (dict(negative_prompt=["a", "b"]), ValueError, r"`negative_prompt`: 2 negative prompts for 1 prompts"),
    (dict(negative_prompt=3), TypeError, r"`negative_prompt`: got 3"),
    (dict(generator=[torch.Generator()] * 2), ValueError, r"`generator`: a list of 2 generators for 1 images"),
    (dict(seed=[1, 2]), ValueError, r"`seed`: a list of 2 seeds for 1 images"),
    (dict(seed="7"), TypeError, r"`seed`: got '7'; expected an integer or a list of integers"),
    (dict(seed=1, generator=torch.Generator()), ValueError, r"`generator` and `seed`: give at most one"),
    (dict(latents=torch.zeros(2, 4, 8, 8)), ValueError, r"`latents`: got torch.Size\(\[2, 4, 8, 8\]\)"),
    (dict(image=np.zeros((16, 16, 3), np.uint8), strength=0), ValueError, r"`strength`: got 0; expected a number in \(0, 1\]"),
    (dict(image=np.zeros((16, 16, 3), np.uint8), strength=1.5), ValueError, r"`strength`: got 1.5"),
    (dict(image=np.zeros((16, 16, 3), np.uint8), strength=0.1, num_inference_steps=5), ValueError,
     r"`strength`: 0.1 of 5 steps runs int\(5 \* 0.1\) = 0 steps"),
    (dict(image="no/such/file.png"), ValueError, r"`image`: no file at 'no/such/file.png'"),
    (dict(image=np.zeros((16, 16, 5), np.uint8)), ValueError, r"`image`: array of shape \(16, 16, 5\) is not an image"),
    (dict(image=np.full((16, 16, 3), 2.0)), ValueError, r"`image`: a float array must hold values in \[0, 1\]"),
    (dict(image=42), TypeError, r"`image`: got int; expected a PIL image"),
    # non-finite and out-of-range numbers, wrong types, wrong shapes (issue 10)
    (dict(guidance_scale=float("nan")), ValueError, r"`guidance_scale`: got nan; expected a finite number"),
    (dict(guidance_scale=float("inf")), ValueError, r"`guidance_scale`: got inf; expected a finite number"),
    (dict(guidance_scale="7"), TypeError, r"`guidance_scale`: got '7'; expected a number >= 0"),
    (dict(guidance_scale=True), TypeError, r"`guidance_scale`: got True"),
    (dict(eta="x"), TypeError, r"`eta`: got 'x'; expected a number in \[0, 1\]"),
    (dict(eta=float("nan")), ValueError, r"`eta`: got nan; expected a finite number"),
    (dict(eta=1.5), ValueError, r"`eta`: got 1.5; expected a number in \[0, 1\]"),
    (dict(strength=float("nan")), ValueError, r"`strength`: got nan; expected a finite number"),
    (dict(image=np.zeros((16, 16, 3)), strength=float("inf")), ValueError, r"`strength`: got inf"),
    (dict(image=np.full((16, 16, 3), np.nan)), ValueError, r"`image`: holds 768 NaN or infinite values"),
    (dict(image=torch.full((3, 16, 16), float("inf"))), ValueError, r"`image`: holds 768 NaN or infinite values"),
    (dict(latents=torch.full((1, 4, 8, 8), float("nan"))), ValueError, r"`latents`: holds NaN or infinity"),
    (dict(latents=torch.zeros(1, 3, 8, 8)), ValueError, r"`latents`: got 3 channels \(shape \(1, 3, 8, 8\)\); the "
                                                        r"UNet takes 4"),
    (dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.int64)), TypeError, r"`latents`: got dtype torch.int64"),
    (dict(latents=np.zeros((1, 4, 8, 8))), TypeError, r"`latents`: got ndarray; expected a \(1, 4, height / 2"),
    (dict(latents=torch.zeros(1, 4, 8, 8), height=32), ValueError, r"`latents`: shape \(1, 4, 8, 8\) is for height 16, "
                                                                   r"but `height` is 32"),
    (dict(seed=2**70), ValueError, r"`seed`: got 1180591620717411303424; expected integers in \[0, 2\*\*64 - 1\]"),
    (dict(seed=-1), ValueError, r"`seed`: got -1; expected integers in \[0, 2\*\*64 - 1\] .*seed=None draws"),
    (dict(seed=2**64 - 1, num_images_per_prompt=2), ValueError, r"`seed`: got 18446744073709551615 \(image seed "
                                                                r"18446744073709551616\)"),
    (dict(seed=[0, -5], num_images_per_prompt=2), ValueError, r"`seed`: got \[0, -5\] \(image seed -5\)"),
    (dict(generator="x"), TypeError, r"`generator`: got 'x'; expected a torch.Generator"),
    (dict(callback=3), TypeError, r"`callback`: got int; expected a function"),
    (dict(num_inference_steps=10**9), ValueError, r"`num_inference_steps`: got 1000000000; expected at most 1000"),
    (dict(num_images_per_prompt=10**9), ValueError, r"`num_images_per_prompt`, `height`, `width`: 1000000000 "
                                                    r"image\(s\) of 16x16 .* GiB, more than the memory of the cpu "
                                                    r"device .* raise ldm_pipeline.runtime.guards.MEMORY_LIMIT"),
    (dict(height=100000, width=100000), ValueError, r"1 image\(s\) of 100000x100000 in torch.float32 need at "
                                                    r"least 1.79e\+03 GiB"),
    (dict(negative_prompt_embeds=torch.zeros(2, 77, 32)), ValueError, r"`negative_prompt_embeds`: 2 rows for 1 "
                                                                       r"prompts"),
    (dict(negative_prompt_embeds=torch.zeros(1, 77, 16)), ValueError, r"`negative_prompt_embeds`: got shape "
                                                                       r"\(1, 77, 16\); the UNet's cross-attention "
                                                                       r"takes 32"),
]


@pytest.mark.parametrize("kwargs, error, message", CASES, ids=[str(list(c[0])) + str(i) for i, c in enumerate(CASES)])
def test_bad_arguments_are_rejected_before_any_model_runs(guarded, kwargs, error, message):
    with pytest.raises(error, match=message):
        guarded(kwargs.pop("prompt", "a cat"), progress=False, **kwargs)


IMAGE_CASES = [case for case in CASES if "image" in case[0]]


@pytest.mark.parametrize("kwargs, error, message", IMAGE_CASES,
                         ids=[str(list(c[0])) + str(i) for i, c in enumerate(IMAGE_CASES)])
def test_image_errors_come_before_the_vae_encodes(guarded, kwargs, error, message):
    with pytest.raises(error, match=message):
        guarded(**EMBEDS, progress=False, **kwargs)


def test_prompt_and_prompt_embeds_both_or_neither(guarded):
    with pytest.raises(ValueError, match=r"`prompt` and `prompt_embeds`: give exactly one of them, got both"):
        guarded("a cat", prompt_embeds=torch.zeros(1, 77, 32))
    with pytest.raises(ValueError, match=r"got neither"):
        guarded()
    with pytest.raises(TypeError, match=r"`prompt`: got 5; expected a string or a non-empty list of strings"):
        guarded(5)
    with pytest.raises(TypeError, match=r"`prompt`: got \[\]"):
        guarded([])


def test_bad_embeddings(guarded):
    for embeds, error, message in [
        (torch.full((1, 77, 32), float("nan")), ValueError, r"`prompt_embeds`: holds NaN or infinity"),
        (torch.zeros(1, 77, 32, dtype=torch.int32), TypeError, r"`prompt_embeds`: got dtype torch.int32"),
        (torch.zeros(1, 0, 32), ValueError, r"`prompt_embeds`: got shape \(1, 0, 32\)"),
        (torch.zeros(77, 32), ValueError, r"`prompt_embeds`: got shape \(77, 32\); expected a \(batch, tokens, dim\)"),
        (torch.zeros(1, 77, 24), ValueError, r"`prompt_embeds`: got shape \(1, 77, 24\); the UNet's cross-attention "
                                             r"takes 32 features"),
        ([[0.0]], TypeError, r"`prompt_embeds`: got list"),
    ]:
        with pytest.raises(error, match=message):
            guarded(prompt_embeds=embeds, progress=False)
    with pytest.raises(ValueError, match=r"`negative_prompt_embeds`: holds NaN or infinity"):
        guarded(**{**EMBEDS, "negative_prompt_embeds": torch.full((1, 77, 32), float("-inf"))}, progress=False)


def test_unreadable_image_file(guarded, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"`image`: '.*broken.png' is not a readable image"):
        guarded(**EMBEDS, image=bad)
    assert bad.read_bytes() == b"not a png at all"


def test_unknown_scheduler_name(pipe):
    with pytest.raises(ValueError, match=r"`scheduler`: unknown name 'eulr'; expected one of \['ddim', 'ddpm'"):
        pipe.set_scheduler("eulr")


def test_components_of_the_wrong_kind(components):
    from ldm_pipeline import LatentDiffusionPipeline

    with pytest.raises(TypeError, match=r"`unet`: got AutoencoderKL; expected a .*UNet2DConditionModel"):
        LatentDiffusionPipeline(**{**components, "unet": components["vae"]})
    with pytest.raises(TypeError, match=r"`scheduler`: got NoneType"):
        LatentDiffusionPipeline(**{**components, "scheduler": None})

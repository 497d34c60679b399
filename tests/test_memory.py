"""Memory helpers: attention and VAE slicing, VAE tiling (decode and image-to-image encode), model offload."""

import numpy as np
import pytest
import torch

from ldm_pipeline import LatentDiffusionPipeline

FAST = dict(num_inference_steps=3, progress=False, output_type="np", seed=3)


def _uint8(images):
    return np.round(np.asarray(images) * 255).astype(np.int16)


def _count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_attention_slicing_gives_the_same_pixels_and_comes_off(pipe):
    before = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    reference = pipe(["a cat", "a dog"], **FAST).images
    for size in ("max", "auto", 1):
        assert pipe.enable_attention_slicing(size) is pipe
        assert all("Sliced" in type(p).__name__ for p in pipe.unet.attn_processors.values())
        assert np.abs(_uint8(pipe(["a cat", "a dog"], **FAST).images) - _uint8(reference)).max() <= 1
    pipe.disable_attention_slicing()
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before
    with pytest.raises(ValueError, match=r"`slice_size`: got 0; expected \"auto\", \"max\" or an integer >= 1"):
        pipe.enable_attention_slicing(0)


def test_vae_slicing_decodes_one_image_at_a_time_with_the_same_pixels(pipe):
    reference = pipe("a cat", num_images_per_prompt=3, **FAST).images
    calls = _count_calls(pipe.vae.decoder)
    pipe.enable_vae_slicing()
    sliced = pipe("a cat", num_images_per_prompt=3, **FAST).images
    assert len(calls) == 3  # one decoder pass per image
    assert np.abs(_uint8(sliced) - _uint8(reference)).max() <= 1
    pipe.disable_vae_slicing()
    pipe("a cat", num_images_per_prompt=3, **FAST)
    assert len(calls) == 4


@pytest.fixture(scope="module")
def bundled():
    return LatentDiffusionPipeline.from_pretrained()  # a trained VAE: tiling is judged on real decodes


def _decode(pipe, latents, tile_size=None, overlap=0.25):
    pipe.disable_vae_tiling()
    if tile_size:
        pipe.enable_vae_tiling(tile_size)
    pipe.vae.tile_overlap_factor = overlap
    with torch.no_grad():
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    pipe.vae.tile_overlap_factor = 0.25
    return (pixels[0].clamp(-1, 1) + 1) * 127.5  # (3, H, W) in uint8 levels


def _decoder_passes(pipe, latents, tile_size=None):
    """`_decode`, and the (h, w) of the latents each pass of the VAE's decoder saw."""
    passes = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda module, args: passes.append(tuple(args[0].shape[-2:])))
    try:
        return _decode(pipe, latents, tile_size), passes
    finally:
        hook.remove()


def _seam_jump(image, seams):
    """The largest jump across a seam line, in uint8 levels, beyond the jumps across the lines beside it.

    A seam runs along the whole line, so each line's step is the median over the line of the step
    between neighbouring pixels: an object's edge crossing the seam moves the median little. A
    ratio of steps would not do here: this small VAE draws faint texture in the blend bands, so a
    seam that jumps by one level could read as 1.3 times its neighbours.
    """
    worst = 0.0
    for dim in (1, 2):
        steps = (image.narrow(dim, 1, image.shape[dim] - 1) - image.narrow(dim, 0, image.shape[dim] - 1)).abs()
        steps = steps.mean(dim=0)  # (rows, columns) of steps, the channels averaged
        steps = (steps if dim == 1 else steps.T).median(dim=1).values  # one step per seam-parallel line
        for s in seams:
            near = torch.cat([steps[s - 6:s - 1], steps[s + 2:s + 7]]).mean()
            worst = max(worst, float(steps[s] - near))
    return worst


def test_tiled_decode_is_close_to_the_untiled_one_with_no_visible_seams(bundled):
    """Tiles of 64 px (the bundled VAE's own size) on 192 px: blends of 16 px, a new tile every 48 px."""
    drawn = bundled("a red circle in the top left", height=192, width=192, num_inference_steps=10, seed=0,
                    output_type="latent", progress=False).images
    flat = torch.tensor([0.8, 0.2, 0.2]).view(1, 3, 1, 1).expand(1, 3, 192, 192) * 2 - 1
    with torch.no_grad():
        flat = bundled.vae.encode(flat).latent_dist.mean * bundled.vae.config.scaling_factor
    seams = [48 * k + offset for k in (1, 2, 3) for offset in (-1, 15) if 48 * k + offset < 190]
    factor = bundled.vae_scale_factor
    per_side = len(range(0, 192 // factor, 48 // factor))  # tiles along a side: one every 48 px
    for latents in (drawn, flat):
        untiled, untiled_passes = _decoder_passes(bundled, latents)
        tiled, tiled_passes = _decoder_passes(bundled, latents, 64)
        assert untiled_passes == [(192 // factor, 192 // factor)]
        # tiling happened: one decoder pass per tile of at most 64 px, and pixels other than the untiled ones
        assert len(tiled_passes) == per_side ** 2 == 16 and max(map(max, tiled_passes)) == 64 // factor
        assert (tiled - untiled).abs().max() > 1  # measured: 37 levels drawn, 110 flat red
        assert tiled.shape == untiled.shape == (3, 192, 192)
        assert (tiled - untiled).abs().mean() < 25  # see README: this small VAE's tiles see less context
        assert _seam_jump(tiled, seams) < 3.5  # measured: 0.2 levels drawn, 2.8 flat red
        # what the measure is there to catch: a seam of 5 levels along one line, on the same picture
        stepped = untiled.clone()
        stepped[:, :, 96:] += 5
        assert _seam_jump(stepped, [95]) > 4 and _seam_jump(untiled, [95]) < 1
    gap = (_decode(bundled, drawn, 64) - _decode(bundled, drawn)).abs().mean()
    assert gap < 5  # a drawn picture: 1.4 levels in the mean


def test_tiling_applies_to_image_to_image_encoding_and_small_images_are_not_tiled(bundled):
    reference = bundled("a red circle in the top left", height=128, width=128, num_inference_steps=5, seed=0,
                        output_type="np", progress=False).images[0]
    untiled = bundled("a blue square", image=reference, strength=0.5, num_inference_steps=4, seed=1,
                      output_type="np", progress=False).images
    encoder_calls, decoder_calls = _count_calls(bundled.vae.encoder), _count_calls(bundled.vae.decoder)
    bundled.enable_vae_tiling(64)
    try:
        tiled = bundled("a blue square", image=reference, strength=0.5, num_inference_steps=4, seed=1,
                        output_type="np", progress=False).images
        assert len(encoder_calls) == 9 and len(decoder_calls) == 9  # 3 x 3 tiles of 64 px, every 48 px
        assert tiled.shape == untiled.shape and np.abs(tiled - untiled).mean() < 0.1
        bundled("a blue square", height=64, width=64, num_inference_steps=2, seed=1, progress=False)
        assert len(decoder_calls) == 10  # one tile's worth: decoded whole
    finally:
        bundled.disable_vae_tiling()
    with pytest.raises(ValueError, match=r"`tile_size`: got 30; expected None or an integer multiple of 4"):
        bundled.enable_vae_tiling(30)


def test_model_offload_keeps_one_model_on_the_device_at_a_time(pipe):
    """On a CPU machine the 'device' is cpu:0: torch keeps the tensors where they are, but every move the
    hooks make is recorded, so which models would be on the GPU at each moment is known."""
    reference_t2i = pipe("a cat", **FAST).images
    reference_i2i = pipe("a cat", image=reference_t2i[0], strength=0.6, **FAST).images
    models = {"text_encoder": pipe.text_encoder, "unet": pipe.unet, "vae": pipe.vae}
    where = {}
    for name, model in models.items():
        def to(*args, _name=name, _to=model.to, **kwargs):
            target = args[0] if args else kwargs.get("device")
            if isinstance(target, (str, torch.device)):
                where[_name] = torch.device(target)
            return _to(*args, **kwargs)
        model.to = to  # an instance attribute, taken off at the end
    seen = []  # (the model that runs, the models on the device then)
    # inner modules: they run after the hooks on the model have moved it
    for name, module in (("text_encoder", pipe.text_encoder.get_input_embeddings()), ("unet", pipe.unet.conv_in),
                         ("vae", pipe.vae.decoder), ("vae", pipe.vae.encoder)):
        module.register_forward_pre_hook(lambda *_, _name=name: seen.append(
            (_name, sorted(n for n, d in where.items() if d == torch.device("cpu", 0)))))
    assert pipe.enable_model_cpu_offload("cpu:0") is pipe
    assert pipe.device == torch.device("cpu", 0)
    pipe.embedding_cache = type(pipe.embedding_cache)()  # so that the text encoder runs
    assert np.array_equal(pipe("a cat", **FAST).images, reference_t2i)
    assert seen[0] == ("text_encoder", ["text_encoder"]) and ("unet", ["unet"]) in seen and ("vae", ["vae"]) in seen
    assert all(on == [running] for running, on in seen)
    assert [n for n, d in where.items() if d == torch.device("cpu", 0)] == []  # all back on the CPU after the call
    seen.clear()
    pipe.embedding_cache = type(pipe.embedding_cache)()
    image_to_image = pipe("a cat", image=reference_t2i[0], strength=0.6, **FAST).images
    assert np.array_equal(image_to_image, reference_i2i)
    order = [running for i, (running, _) in enumerate(seen) if i == 0 or seen[i - 1][0] != running]
    assert order == ["text_encoder", "vae", "unet", "vae"]  # the VAE encodes, then leaves the device to the UNet
    assert all(on == [running] for running, on in seen)
    pipe.disable_model_cpu_offload()
    for model in models.values():
        vars(model).pop("to", None)
    assert pipe.offload is None and not hasattr(pipe.unet, "_hf_hook") and pipe.device.type == "cpu"
    assert np.array_equal(pipe("a cat", **FAST).images, reference_t2i)


def test_model_offload_needs_a_device_and_to_takes_it_off(pipe, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"`device`: model offload moves each model to a GPU .* no GPU was found"):
        pipe.enable_model_cpu_offload()
    pipe.enable_model_cpu_offload("cpu")
    pipe.to("cpu")
    assert pipe.offload is None and not hasattr(pipe.vae, "_hf_hook")


def test_cli_low_memory_and_tile_vae_switch_the_helpers_on(pipe, tmp_path, monkeypatch, capsys):
    from ldm_pipeline.apps.cli import main

    model = pipe.save_pretrained(tmp_path / "model")
    switched = []
    for name in ("enable_attention_slicing", "enable_vae_slicing", "enable_vae_tiling", "enable_model_cpu_offload"):
        original = getattr(LatentDiffusionPipeline, name)
        monkeypatch.setattr(LatentDiffusionPipeline, name,
                            lambda self, *a, _name=name, _original=original, **k: switched.append(_name)
                            or _original(self, *a, **k))
    common = ["generate", "a cat", "--model", str(model), "--steps", "2", "--seed", "1", "--size", "32x32"]
    assert main([*common, "--out", str(tmp_path / "plain.png")]) == 0 and switched == []
    assert main([*common, "--tile-vae", "--out", str(tmp_path / "tiled.png")]) == 0
    assert switched == ["enable_vae_tiling"]
    switched.clear()
    assert main([*common, "--low-memory", "--out", str(tmp_path / "low.png")]) == 0
    assert switched == ["enable_attention_slicing", "enable_vae_slicing", "enable_vae_tiling"]  # no offload on CPU
    import PIL.Image
    with PIL.Image.open(tmp_path / "tiled.png") as a, PIL.Image.open(tmp_path / "low.png") as b:
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1  # slicing changes no pixel
    capsys.readouterr()
    assert main([*common, "--low-memory", "--device", "cuda", "--compile", "--out", str(tmp_path / "x.png")]) == 2
    assert "--compile: cannot be combined with --low-memory on a GPU" in capsys.readouterr().err


def test_the_memory_guard_counts_one_image_with_vae_slicing_and_one_tile_with_tiling(pipe):
    from ldm_pipeline.runtime import guards

    def needed():
        return guards.memory_needed(pipe.vae, pipe.unet, 4, 256, 256, torch.float32, decode=True)

    whole = needed()
    assert pipe.enable_vae_slicing() and needed() == whole // 4
    # (256 / 32)**2 tiles, but never less than the decoded images themselves (4 x 3 x 256 x 256 floats)
    assert pipe.enable_vae_tiling(32) and needed() == max(whole // 4 // 64, 4 * 3 * 256 * 256 * 4)
    pipe.disable_vae_slicing().disable_vae_tiling()
    assert needed() == whole

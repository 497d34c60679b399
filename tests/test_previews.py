"""Live previews: the latent-to-RGB map, its cache, and `pipe(preview=..., preview_every=...)`."""

from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.sampling import previews
from ldm_pipeline.apps.cli import main
from ldm_pipeline.sampling.probes import record_x0


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test its own preview cache, and no map remembered from another test."""
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    previews._in_memory.clear()
    return tmp_path / "cache" / "previews"


@pytest.fixture(scope="module")
def bundled_vae():
    return LatentDiffusionPipeline.from_pretrained().vae


def _patches(count: int, size: int) -> torch.Tensor:
    """Flat colour patches (N, 3, size, size) in [-1, 1]."""
    colours = torch.rand(count, 3, 1, 1, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return colours.expand(count, 3, size, size).contiguous()


class LinearVae(torch.nn.Module):
    """A VAE-shaped stand-in whose decoder is exactly linear per latent cell: the fit must recover it."""

    def __init__(self, weight, bias, factor=4):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
        self.config = SimpleNamespace(scaling_factor=0.5, block_out_channels=[8] * (factor.bit_length()))

    def encode(self, pixels):
        cells = torch.nn.functional.avg_pool2d(pixels, 4)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=torch.cat([cells, cells[:, :1] * cells[:, 1:2]], 1)))

    def decode(self, z):
        colours = torch.einsum("rc,bchw->brhw", self.weight, z) + self.bias[None, :, None, None]
        return SimpleNamespace(sample=torch.nn.functional.interpolate(colours, scale_factor=4, mode="nearest"))


def test_the_fit_recovers_a_linear_decoder_exactly():
    # small enough that the decode never reaches the [-1, 1] clamp, where it would stop being linear
    weight = torch.tensor([[0.3, -0.1, 0.1, 0.2], [0.0, 0.2, -0.2, 0.1], [0.1, 0.1, 0.3, -0.2]])
    bias = torch.tensor([0.1, -0.2, 0.05])
    vae = LinearVae(weight, bias)
    preview = previews.fit(vae, count=16)
    assert preview.factor == 4
    # the map reads diffusion latents, i.e. the VAE's latents times scaling_factor 0.5
    torch.testing.assert_close(preview.weight, weight / 0.5, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(preview.bias, bias, atol=1e-3, rtol=1e-3)


def test_the_map_follows_a_trained_decoder_on_re_encoded_colour_patches(bundled_vae):
    preview = previews.fit(bundled_vae, count=64)
    assert preview.weight.shape == (3, 4) and preview.factor == 4
    patches = _patches(12, 64)
    latents = previews.encode_pictures(bundled_vae, previews.decode(bundled_vae, previews.encode_pictures(bundled_vae, patches)))
    real = previews.decode(bundled_vae, latents)
    error = (preview.pixels(latents) - real).abs().mean()
    constant = (real - real.mean(dim=(0, 2, 3), keepdim=True)).abs().mean()  # the best single colour per channel
    # Random flat colours are far from the shapes this VAE was trained on, and it decodes them far from
    # linearly: measured 0.86 of the constant's error, correlation r, g, b 0.81, 0.29, 0.54 (the VAE
    # bundled before 2026-12-01: under 0.85, all over 0.6). Better than any single colour, and red best.
    assert error < 0.9 * constant
    measured = previews.fidelity(preview, bundled_vae, latents)
    assert measured["images"] == 12 and max(measured["correlation"]) > 0.75 and min(measured["correlation"]) > 0.2


def test_any_number_of_latent_channels(components):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[16, 16, 16], latent_channels=8, norm_num_groups=8,
                        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3).eval()
    preview = previews.fit(vae, count=8)
    assert preview.weight.shape == (3, 8) and preview.factor == 4
    images = preview.images(torch.randn(2, 8, 5, 6))
    assert len(images) == 2 and images[0].size == (24, 20)


def test_cache_round_trip_and_a_changed_vae_refits(components, cache, monkeypatch):
    fits = []
    real_fit = previews.fit
    monkeypatch.setattr(previews, "fit", lambda vae, *a, **k: fits.append(1) or real_fit(vae, count=16))
    vae = components["vae"]
    first = previews.map_for(vae, stored=[])
    assert len(fits) == 1 and (cache / f"{previews.fingerprint(vae)}.json").is_file()
    assert previews.map_for(vae, stored=[]) is first  # in memory
    previews._in_memory.clear()
    again = previews.map_for(vae, stored=[])  # from the disk cache
    assert len(fits) == 1 and torch.equal(again.weight, first.weight) and torch.equal(again.bias, first.bias)
    with torch.no_grad():
        vae.decoder.conv_out.bias += 0.3  # same object, changed in place
    changed = previews.map_for(vae, stored=[])
    assert len(fits) == 2 and changed.fingerprint != first.fingerprint
    assert not torch.allclose(changed.bias, first.bias)
    assert len(list(cache.glob("*.json"))) == 2 and not list(cache.glob(".*.partial.*"))


def test_a_broken_cache_file_is_refitted(components, cache):
    vae = components["vae"]
    cache.mkdir(parents=True)
    (cache / f"{previews.fingerprint(vae)}.json").write_text("{not json")
    preview = previews.map_for(vae, stored=[])
    assert previews.load(cache / f"{preview.fingerprint}.json").fingerprint == preview.fingerprint


def test_the_bundled_model_ships_its_map(bundled_vae, cache):
    shipped = previews.load(previews.STORED[0])
    assert shipped is not None and shipped.fingerprint == previews.fingerprint(bundled_vae)
    found = previews.map_for(bundled_vae)
    assert torch.equal(found.weight, shipped.weight) and not cache.exists()  # nothing fitted, nothing cached  # nothing fitted, nothing cached


def test_previews_every_k_steps_show_the_predicted_x0(pipe, monkeypatch):
    # a fixed map of small weights: the tiny random UNet's x_0 is large (std 7), and the tiny VAE's own fit saturates
    weight = torch.tensor([[0.2, -0.1, 0.1, 0.05], [0.0, 0.15, -0.1, 0.1], [0.1, 0.05, 0.2, -0.1]]) / 10
    preview = previews.PreviewMap(weight=weight, bias=torch.zeros(3), factor=2, fingerprint="test")
    monkeypatch.setattr(previews, "map_for", lambda vae: preview)
    frames = []
    with record_x0(pipe.unet, pipe.scheduler, 7.5) as record:
        out = pipe(["a cat", "a red circle"], num_inference_steps=7, seed=0, guidance_scale=7.5, height=16, width=24,
                   preview=frames.append, preview_every=3, progress=False)
    assert [[image.info["step"] for image in images] for images in frames] == [[3, 3], [6, 6], [7, 7]]
    assert all(len(images) == 2 and all(image.size == (24, 16) for image in images) for images in frames)
    for images, step in zip(frames, (2, 5, 6)):
        expected = np.stack([np.asarray(image) for image in preview.images(record.x0[step])])
        shown = np.stack([np.asarray(image) for image in images])
        assert np.abs(shown.astype(int) - expected).max() <= 1
    noisy = np.stack([np.asarray(image) for image in preview.images(record.samples[2])])
    first = np.stack([np.asarray(image) for image in frames[0]])
    assert np.abs(first.astype(int) - noisy).mean() > 3  # not a picture of the noisy latents
    assert len(out.images) == 2


def test_previews_do_not_change_the_pixels(pipe):
    plain = pipe("a red circle", num_inference_steps=6, seed=3, output_type="np", progress=False).images
    shown = []
    previewed = pipe("a red circle", num_inference_steps=6, seed=3, output_type="np", progress=False,
                     preview=shown.append, preview_every=1).images
    assert len(shown) == 6
    np.testing.assert_array_equal(plain, previewed)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(preview="strip.png"), TypeError, "`preview`: got str"),
    (dict(preview=print, preview_every=0), ValueError, "`preview_every`: got 0"),
    (dict(preview=print, preview_every=2.5), ValueError, "`preview_every`: got 2.5"),
    (dict(preview=print, preview_every=True), ValueError, "`preview_every`: got True"),
])
def test_bad_preview_arguments_are_refused_before_any_work(pipe, monkeypatch, kwargs, error, message):
    monkeypatch.setattr(previews, "map_for", lambda *a, **k: pytest.fail("a map was looked for"))
    monkeypatch.setattr(pipe.text_encoder, "forward", lambda *a, **k: pytest.fail("the text encoder ran"))
    with pytest.raises(error, match=message):
        pipe("a cat", num_inference_steps=2, **kwargs)


def test_cli_writes_a_preview_strip(pipe, tmp_path, capsys):
    model = pipe.save_pretrained(tmp_path / "model")
    strip, out = tmp_path / "strip.png", tmp_path / "out.png"
    assert main(["generate", "a cat", "a red circle", "--model", str(model), "--steps", "4", "--seed", "0",
                 "--size", "16x16", "--preview", str(strip), "--preview-every", "2", "--out", str(out)]) == 0
    with PIL.Image.open(strip) as picture:
        assert picture.size == (2 * 16 + 2, 2 * 16 + 2)  # steps 2 and 4, a row per image
    assert "2 previews" in capsys.readouterr().out
    assert main(["generate", "a cat", "--model", str(model), "--preview", str(tmp_path / "s.gif"),
                 "--out", str(out)]) == 2
    assert "--preview: got" in capsys.readouterr().err

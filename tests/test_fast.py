"""pipe.compile(): the compiled UNet draws what the eager one draws, and follows every change.

Compiling takes seconds even for the tiny UNet, so the packages are built into one folder
shared by this module's tests, and the cases are few.
"""

import warnings

import numpy as np
import pytest
import torch

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.provenance import hashes as digests
from ldm_pipeline.fast import compile as fast

PROMPT = "a red circle in the top left"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("compiled")


def draw(pipe, **kwargs):
    kwargs = {"seed": 0, "num_inference_steps": 4, "progress": False, "output_type": "np", **kwargs}
    return pipe(PROMPT, **kwargs).images


def forward_calls(unet):
    """Counts the eager UNet's forward calls: the compiled path must make none."""
    calls = []
    handle = unet.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls, handle


def assert_same_pixels(a, b):
    assert np.abs(np.round(a * 255) - np.round(b * 255)).max() <= 1
    assert np.abs(a - b).max() < 1e-3


def test_compiled_pipeline_draws_the_eager_pixels_and_skips_the_eager_unet(components, cache):
    eager = LatentDiffusionPipeline(**components)
    expected = draw(eager)
    pipe = LatentDiffusionPipeline(**components).compile(cache_dir=cache, verbose=False)
    assert len(list(cache.glob("unet-*.pt2"))) == 1  # compile() paid for the default size now
    calls, handle = forward_calls(pipe.unet)
    got = draw(pipe)
    handle.remove()
    assert not calls
    assert_same_pixels(got, expected)


def test_the_text_keys_and_values_are_computed_once_per_call_not_per_step(components, cache, monkeypatch):
    pipe = LatentDiffusionPipeline(**components).compile(cache_dir=cache, verbose=False)
    calls = []
    real = fast.keys_values
    monkeypatch.setattr(fast, "keys_values", lambda *args: calls.append(1) or real(*args))
    got = draw(pipe, num_inference_steps=5)
    assert len(calls) == 1
    assert_same_pixels(got, draw(LatentDiffusionPipeline(**components), num_inference_steps=5))
    draw(pipe, num_inference_steps=5, negative_prompt="a blue square")  # a new context, new keys
    assert len(calls) == 2


def test_a_new_process_reuses_the_package_from_disk(components, cache, monkeypatch):
    LatentDiffusionPipeline(**components).compile(cache_dir=cache, verbose=False)  # built by now, or here
    monkeypatch.setattr(fast, "build_package", lambda *a, **k: pytest.fail("rebuilt a cached package"))
    pipe = LatentDiffusionPipeline(**components).compile(cache_dir=cache, verbose=False)
    assert_same_pixels(draw(pipe), draw(LatentDiffusionPipeline(**components)))


def test_compiled_pipeline_follows_new_weights_sizes_batches_and_schedulers(components, cache):
    pipe = LatentDiffusionPipeline(**components).compile(cache_dir=cache, verbose=False)
    eager = LatentDiffusionPipeline(**components)  # shares the modules: sees the same weight changes
    before = draw(pipe)
    with torch.no_grad():
        pipe.unet.conv_out.bias.add_(0.5)  # in place, as a fine-tune or an adapter would
    changed = draw(pipe)
    assert np.abs(changed - before).max() > 0.01  # the old package's baked-in weights were not used
    assert_same_pixels(changed, draw(eager))
    assert_same_pixels(draw(pipe, height=24, width=24), draw(eager, height=24, width=24))
    assert_same_pixels(draw(pipe, num_images_per_prompt=2), draw(eager, num_images_per_prompt=2))
    pipe.set_scheduler("euler")
    eager.set_scheduler("euler")
    assert_same_pixels(draw(pipe), draw(eager))


def test_package_key_names_everything_baked_into_a_package(components):
    unet = components["unet"]
    digest = fast.weights_digest(unet)
    key = fast.package_key(unet, digest, (4, 8, 8), (77, 32), 2)
    assert key == fast.package_key(unet, fast.weights_digest(unet), (4, 8, 8), (77, 32), 2)
    others = {fast.package_key(unet, digest, (4, 12, 8), (77, 32), 2),
              fast.package_key(unet, digest, (4, 8, 8), (64, 32), 2),
              fast.package_key(unet, digest, (4, 8, 8), (77, 32), 4)}
    state = digests.weights_state(unet)
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] += 1
    assert digests.weights_state(unet) != state
    others.add(fast.package_key(unet, fast.weights_digest(unet), (4, 8, 8), (77, 32), 2))
    unet.to(torch.float64)
    others.add(fast.package_key(unet, fast.weights_digest(unet), (4, 8, 8), (77, 32), 2))
    assert key not in others and len(others) == 5


def test_compile_rejects_unknown_modes_and_bad_sizes(pipe, tmp_path):
    with pytest.raises(ValueError, match="`mode`: got 'fastest'"):
        pipe.compile("fastest", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="`height`: got 13"):
        pipe.compile(cache_dir=tmp_path, height=13)
    assert pipe.compiled is None and not any(tmp_path.iterdir())


def test_a_package_that_cannot_be_built_mid_call_falls_back_to_eager_with_a_warning(components, tmp_path,
                                                                                  monkeypatch):
    pipe = LatentDiffusionPipeline(**components).compile(cache_dir=tmp_path, batch=None, verbose=False)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(fast, "build_package", broken)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        got = draw(pipe)
    np.testing.assert_array_equal(got, draw(LatentDiffusionPipeline(**components)))
    with warnings.catch_warnings(record=True) as caught:  # the failure is remembered: no second try
        warnings.simplefilter("always")
        draw(pipe)
    assert not [w for w in caught if "compiling the UNet" in str(w.message)]


def test_the_default_mode_is_a_package_on_the_cpu_and_cuda_graphs_on_a_gpu(pipe, tmp_path):
    assert fast.default_mode(torch.device("cpu")) == "aot"
    assert fast.default_mode(torch.device("cuda:0")) == "reduce-overhead"
    assert pipe.compile(cache_dir=tmp_path, batch=None).compiled.mode == "aot"


def test_an_sdxl_unet_compiles_with_its_added_conditions(base, cache):
    """AOT on SDXL: the package takes the pooled text and size ids as inputs; eager pixels, no eager UNet call."""
    kwargs = dict(seed=3, num_inference_steps=3, height=16, width=24, progress=False, output_type="np")
    expected = base("a red circle", **kwargs).images
    base.compile(cache_dir=cache, verbose=False, height=16, width=24)
    calls, handle = forward_calls(base.unet)
    got = base("a red circle", **kwargs).images
    other = base("a red circle", **{**kwargs, "original_size": (64, 64)}).images  # other ids: the same package
    handle.remove()
    assert not calls
    assert_same_pixels(got, expected)
    assert np.abs(other - got).max() > 1e-3

"""Fuzzing `pipe(...)`: any values of any arguments, in any combination, either draw finite images or raise a
ValueError or TypeError (or a subclass, such as NonFiniteError), within seconds.

The default run tries a fixed set of examples (derandomized, so CI is repeatable); `pytest -m slow` tries many
more, at random.
"""

from collections import Counter
from datetime import timedelta

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from ldm_pipeline import LatentDiffusionPipeline

FLOATS = st.floats(allow_nan=True, allow_infinity=True)
HUGE = st.sampled_from([10**9, 2**63, 2**70, -(2**63), 10**40])
ODD = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.binary(max_size=3), st.just([]), st.just({}),
                st.just(object()), st.just(torch.tensor(1.0)), st.just(np.float64(2.0)))
# any unicode, control characters included; weighting syntax; prompts longer than one 77-token window
PROMPT = st.one_of(st.text(max_size=40), st.text(alphabet="ab ():.[]\\1", max_size=30),
                   st.sampled_from(["a red circle " * 30, "(a red circle:1.2) " * 25]))


@st.composite
def tensors(draw, max_dims: int = 5):
    shape = draw(st.lists(st.integers(0, 9), min_size=0, max_size=max_dims))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                  torch.bool]))
    fill = draw(st.sampled_from(["randn", 0.0, 1.0, float("nan"), float("inf"), -1e30, 1e4]))
    values = torch.randn(shape) if fill == "randn" else torch.full(shape, fill)
    return values.to(dtype)


@st.composite
def latents_like(draw):
    """Mostly near-valid latents (the tiny UNet's 4 channels, any size), sometimes anything."""
    if draw(st.booleans()):
        return draw(tensors())
    batch, channels = draw(st.integers(1, 3)), draw(st.sampled_from([4, 4, 4, 3, 1]))
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    fill = draw(st.sampled_from([0.0, 1.0, float("nan"), 1e30]))
    return torch.randn(batch, channels, h, w) if fill == 0.0 else torch.full((batch, channels, h, w), fill)


@st.composite
def embeds_like(draw):
    if draw(st.booleans()):
        return draw(tensors(max_dims=4))
    batch, tokens, width = draw(st.integers(1, 3)), draw(st.sampled_from([77, 77, 154, 1, 5])), \
        draw(st.sampled_from([32, 32, 16]))
    fill = draw(st.sampled_from(["randn", float("nan"), 1e30, 0.0]))
    return torch.randn(batch, tokens, width) if fill == "randn" else torch.full((batch, tokens, width), fill)


@st.composite
def images_like(draw):
    kind = draw(st.sampled_from(["pil", "array", "tensor", "path", "odd"]))
    h, w = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    if kind == "pil":
        mode = draw(st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I", "I;16", "F", "CMYK", "YCbCr"]))
        return PIL.Image.new(mode, (max(w, 1), max(h, 1)))
    if kind == "array":
        channels = draw(st.sampled_from([None, 1, 2, 3, 4, 5]))
        shape = (h, w) if channels is None else (h, w, channels)
        dtype = draw(st.sampled_from([np.uint8, np.uint16, np.float32, np.float64, np.int32, np.bool_]))
        fill = draw(st.sampled_from([0, 0.5, 1, 2, -1, np.nan, np.inf]))
        with np.errstate(invalid="ignore"):
            return np.full(shape, fill).astype(dtype)
    if kind == "tensor":
        return draw(tensors(max_dims=4))
    if kind == "path":
        return draw(st.sampled_from(["no/such/file.png", "", ".", "/"]))
    return draw(ODD)


def callbacks():
    return st.one_of(st.none(), st.sampled_from([lambda *a: None, lambda *a: False, lambda step, *a: step < 1]), ODD)


ARGUMENTS = dict(
    prompt=st.one_of(PROMPT, st.lists(PROMPT, max_size=3), ODD, st.lists(ODD, max_size=2)),
    negative_prompt=st.one_of(PROMPT, st.lists(PROMPT, max_size=3), ODD),
    num_inference_steps=st.one_of(st.integers(-2, 4), HUGE, FLOATS, ODD),
    guidance_scale=st.one_of(FLOATS, st.integers(-3, 12), HUGE, ODD),
    height=st.one_of(st.integers(-4, 40), HUGE, FLOATS, ODD),
    width=st.one_of(st.integers(-4, 40), HUGE, FLOATS, ODD),
    num_images_per_prompt=st.one_of(st.integers(-1, 3), HUGE, FLOATS, ODD),
    seed=st.one_of(st.integers(-5, 2**64 + 5), HUGE, st.lists(st.integers(-2, 2**64), max_size=4), ODD),
    generator=st.one_of(st.builds(torch.Generator), st.lists(st.builds(torch.Generator), max_size=3), ODD),
    latents=st.one_of(latents_like(), ODD),
    prompt_embeds=st.one_of(embeds_like(), ODD),
    negative_prompt_embeds=st.one_of(embeds_like(), ODD),
    image=images_like(),
    strength=st.one_of(FLOATS, st.integers(-1, 2), ODD),
    output_type=st.one_of(st.sampled_from(["pil", "np", "pt", "latent", "PIL", ""]), ODD),
    callback=callbacks(),
    eta=st.one_of(FLOATS, st.integers(-1, 2), ODD),
    prompt_weighting=st.one_of(st.booleans(), ODD),
)


def check_result(result, kwargs) -> None:
    images = result.images
    if isinstance(images, list):
        assert all(isinstance(image, PIL.Image.Image) for image in images)
        arrays = [np.asarray(image) for image in images]
    else:
        arrays = [images.float().numpy() if isinstance(images, torch.Tensor) else images]
    assert all(np.isfinite(array).all() for array in arrays), kwargs
    count = images.shape[0] if not isinstance(images, list) else len(images)
    assert count >= 1


OUTCOMES = Counter()  # of the near-valid examples: "drew" or the error's type


def fuzz_once(pipe, kwargs, outcomes: Counter | None = None) -> None:
    try:
        result = pipe(progress=False, **kwargs)
    except (ValueError, TypeError) as error:
        # our errors name the argument (or say where NaN appeared), never a message from deep inside
        assert str(error).startswith("`") or "NaN" in str(error), (error, kwargs)
        if outcomes is not None:
            outcomes[type(error).__name__] += 1
        return
    check_result(result, kwargs)
    if outcomes is not None:
        outcomes["drew"] += 1


@pytest.fixture(scope="module")
def fuzz_pipe(_session_components):
    import copy

    pipe = LatentDiffusionPipeline(**copy.deepcopy(_session_components))
    pipe.defaults["num_inference_steps"] = 3  # arguments left out stay cheap
    return pipe


COMMON = dict(deadline=timedelta(seconds=10), database=None, suppress_health_check=list(HealthCheck))


@settings(max_examples=150, derandomize=True, **COMMON)
@given(kwargs=st.fixed_dictionaries({}, optional=ARGUMENTS))
def test_fuzz_pipeline_call(fuzz_pipe, kwargs):
    fuzz_once(fuzz_pipe, kwargs)


@settings(max_examples=200, derandomize=True, **COMMON)
@given(kwargs=st.fixed_dictionaries({"prompt": PROMPT, "num_inference_steps": st.integers(1, 3)},
                                    optional={k: v for k, v in ARGUMENTS.items() if k not in ("prompt",
                                              "num_inference_steps", "prompt_embeds")}))
def test_fuzz_near_valid_calls(fuzz_pipe, kwargs):
    """With a valid prompt and a few steps, many examples get past the checks and draw."""
    fuzz_once(fuzz_pipe, kwargs, OUTCOMES)


@pytest.mark.slow
@settings(max_examples=3000, **COMMON)
@given(kwargs=st.fixed_dictionaries({}, optional=ARGUMENTS))
def test_fuzz_pipeline_call_long(fuzz_pipe, kwargs):
    fuzz_once(fuzz_pipe, kwargs)


def test_fuzzing_reaches_drawing():
    """The near-valid examples (run just before) are not all errors: the fuzzer reaches the models."""
    if not OUTCOMES:
        pytest.skip("runs after test_fuzz_near_valid_calls")
    assert OUTCOMES["drew"] >= 10, OUTCOMES

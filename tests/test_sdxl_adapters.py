"""LoRA and textual inversion on SDXL: diffusers' and kohya's LoRA files, SDXL embedding pairs (clip_l, clip_g),
diffusers' pixels, recipes, and the errors for files of the other kind."""

import copy
import re
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from sdxl_components import REFINER, close, seeds, theirs

from ldm_pipeline import LatentDiffusionXLPipeline, read_recipe
from ldm_pipeline.adapters.lora import adapted_modules

KW = dict(num_inference_steps=4, guidance_scale=5.0, height=16, width=16, output_type="np")
TARGETS = {"unet": ["to_q", "to_k", "to_v", "to_out.0"], "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj"],
           "text_encoder_2": ["q_proj", "k_proj", "v_proj", "out_proj"]}
RANK = 4


def lora_layers(parts, kinds=("unet", "text_encoder", "text_encoder_2"), seed=1) -> dict[str, dict]:
    """Random LoRA weights (peft state dicts, by component) for the tiny SDXL models `kinds`."""
    torch.manual_seed(seed)
    layers = {}
    for kind in kinds:
        model = copy.deepcopy(parts[kind])
        model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS[kind], init_lora_weights=False))
        layers[kind] = get_peft_model_state_dict(model)
    return layers


def diffusers_file(layers, folder):
    """The layers saved with diffusers' own SDXL writer (keys under unet., text_encoder., text_encoder_2.)."""
    StableDiffusionXLPipeline.save_lora_weights(
        folder, **{f"{kind}_lora_layers": convert_state_dict_to_diffusers(state) for kind, state in layers.items()})
    return folder / "pytorch_lora_weights.safetensors"


# the tiny UNet's attention blocks as Stability's original UNet numbers them (one layer per block)
SGM_BLOCKS = [(r"^down_blocks\.1\.attentions\.0\.", "input_blocks.3.1."),
              (r"^mid_block\.attentions\.0\.", "middle_block.1."),
              (r"^up_blocks\.0\.attentions\.(\d)\.", r"output_blocks.\1.1.")]
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def kohya_file(layers, path, alpha: float):
    """The layers written as kohya's SDXL scripts write them: `lora_unet_` with the original UNet's block names,
    `lora_te1_`/`lora_te2_`, module paths with "_", `lora_down`/`lora_up` and an `alpha` per module."""
    out = {}
    for kind, state in layers.items():
        for key, tensor in state.items():
            module, which = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key).groups()
            for pattern, replacement in SGM_BLOCKS if kind == "unet" else []:
                module = re.sub(pattern, replacement, module)
            if kind != "unet" and not module.startswith("text_model."):  # CLIPTextModel's adapter paths skip it
                module = "text_model." + module
            name = KOHYA_PREFIXES[kind] + module.replace(".", "_")
            out[f"{name}.lora_{'down' if which == 'A' else 'up'}.weight"] = tensor.contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(out, path)
    return path


def draw(pipe, prompt="a red circle", **extra):
    return pipe(prompt, seed=0, progress=False, **KW, **extra).images


def diffusers_draw(parts, lora=None, weight=None, cls=StableDiffusionXLPipeline, config=None, **extra):
    pipe = theirs(cls, copy.deepcopy(parts), **(config or {}))
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="style")
        if weight is not None:
            pipe.set_adapters("style", weight)
    return pipe("a red circle", generator=seeds(0, 1), **KW, **extra).images, pipe


@pytest.fixture
def fresh(_xl_parts):
    """(base, refiner) components that no test changed (`base` changes `base_parts` in place)."""
    return copy.deepcopy(_xl_parts)


def peft_layer_count(*models) -> int:
    return sum(1 for model in models for module in model.modules() if hasattr(module, "lora_A"))


# -- LoRA --------------------------------------------------------------------------------------------


def test_a_diffusers_sdxl_lora_draws_diffusers_pixels_and_acts_on_both_towers(base, fresh, tmp_path):
    plain = draw(base)
    lora = diffusers_file(lora_layers(fresh[0]), tmp_path)
    base.load_lora_weights(lora, adapter_name="style")
    mine = draw(base)
    reference, _ = diffusers_draw(fresh[0], lora)
    close(mine, reference)
    assert np.abs(mine - plain).max() > 0.01
    loaded = adapted_modules(base, "style")
    assert {kind: len(paths) for kind, paths in loaded.items()} == {"unet": 64, "text_encoder": 12,
                                                                   "text_encoder_2": 12}
    base.set_adapters("style", 0.5)
    close(draw(base), diffusers_draw(fresh[0], lora, weight=0.5)[0])


def test_a_lora_on_the_second_tower_alone_changes_the_picture(base, fresh, tmp_path):
    plain = draw(base)
    lora = diffusers_file(lora_layers(fresh[0], kinds=("text_encoder_2",), seed=2), tmp_path)
    base.load_lora_weights(lora)
    mine = draw(base)
    assert np.abs(mine - plain).max() > 0.01  # fails when text_encoder_2's layers are ignored
    close(mine, diffusers_draw(fresh[0], lora)[0])


def test_a_kohya_sdxl_lora_draws_diffusers_pixels_and_the_diffusers_files(base, fresh, tmp_path):
    layers = lora_layers(fresh[0])
    kohya = kohya_file(layers, tmp_path / "style.safetensors", alpha=RANK / 2)  # alpha / rank: a scale of 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every module of the file is used: no warning
        base.load_lora_weights(kohya, adapter_name="style")
    modules = base.lora_info()[0]["modules"]
    mine = draw(base)
    reference, their_pipe = diffusers_draw(fresh[0], kohya)
    close(mine, reference)
    assert modules == 88 == peft_layer_count(their_pipe.unet, their_pipe.text_encoder, their_pipe.text_encoder_2)
    assert len(adapted_modules(base, "style")["text_encoder_2"]) == 12
    # the same weights in diffusers' layout at scale 1: kohya's at weight 2 (alpha / rank = 0.5)
    base.set_adapters("style", 2.0)
    other = LatentDiffusionXLPipeline(**copy.deepcopy(fresh[0]))
    other.load_lora_weights(diffusers_file(layers, tmp_path / "diffusers"))
    np.testing.assert_allclose(draw(base), draw(other), atol=1e-5)


def test_fuse_unfuse_unload_and_the_recipe_on_sdxl(base, tmp_path, fresh):
    plain = draw(base)
    lora = diffusers_file(lora_layers(fresh[0]), tmp_path)
    base.load_lora_weights(lora, adapter_name="style")
    unfused = draw(base)
    second = base.text_encoder_2.text_model.encoder.layers[0].self_attn.q_proj
    before = second.get_base_layer().weight.detach().clone()
    base.fuse_lora()
    assert not torch.equal(second.get_base_layer().weight, before)  # the second tower's weights took it too
    np.testing.assert_allclose(draw(base), unfused, atol=1e-4)
    base.unfuse_lora()
    assert torch.equal(second.get_base_layer().weight, before)
    result = base("a red circle", seed=0, progress=False, **{**KW, "output_type": "pil"})
    recipe = read_recipe(result.save(tmp_path / "out.png")[0])
    assert recipe.loras[0]["name"] == "style" and len(recipe.loras[0]["sha256"]) == 64
    assert np.array_equal(np.asarray(base.reproduce(tmp_path / "out.png", progress=False).images[0]),
                          np.asarray(result.images[0]))
    base.unload_lora_weights()
    assert peft_layer_count(base.unet, base.text_encoder, base.text_encoder_2) == 0
    np.testing.assert_allclose(draw(base), plain, atol=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_a_refiner_takes_a_lora_on_its_unet_and_its_one_tower(refiner, fresh, tmp_path):
    lora = diffusers_file(lora_layers(fresh[1], kinds=("unet", "text_encoder_2")), tmp_path)
    picture = PIL.Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8))
    plain = draw(refiner, image=picture, strength=0.6)
    refiner.load_lora_weights(lora)
    mine = draw(refiner, image=picture, strength=0.6)
    assert np.abs(mine - plain).max() > 0.01
    close(mine, diffusers_draw(fresh[1], lora, cls=StableDiffusionXLImg2ImgPipeline, config=REFINER,
                               image=picture, strength=0.6)[0])


# -- textual inversion -------------------------------------------------------------------------------


def pair(vectors=2, seed=0) -> dict[str, torch.Tensor]:
    """An SDXL embedding: vectors for the first tower (32 wide here) and the second (24)."""
    torch.manual_seed(seed)
    return {"clip_l": torch.randn(vectors, 32) * 0.5, "clip_g": torch.randn(vectors, 24) * 0.5}


def diffusers_ti_draw(parts, state, token, cls=StableDiffusionXLPipeline, config=None, prompt="a <s> circle",
                      **extra):
    """diffusers' SDXL way: load_textual_inversion once per tower."""
    pipe = theirs(cls, copy.deepcopy(parts), **(config or {}))
    if pipe.text_encoder is not None:
        pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    return pipe(prompt, generator=seeds(0, 1), **KW, **extra).images


def test_an_sdxl_embedding_file_draws_diffusers_pixels_and_is_in_the_recipe(base, fresh, tmp_path):
    state = pair(vectors=2)
    save_file(state, tmp_path / "shape.safetensors")
    plain = draw(base, "a circle")
    base.load_textual_inversion(tmp_path / "shape.safetensors", token="<s>")
    assert "<s>_1" in base.tokenizer.get_vocab() and "<s>_1" in base.tokenizer_2.get_vocab()
    mine = draw(base, "a <s> circle")
    close(mine, diffusers_ti_draw(fresh[0], state, "<s>"))
    assert np.abs(mine - plain).max() > 0.01
    result = base("a <s> circle", seed=0, progress=False, **{**KW, "output_type": "pil"})
    recipe = read_recipe(result.save(tmp_path / "out.png")[0])
    assert recipe.embeddings[0]["token"] == "<s>" and len(recipe.embeddings[0]["sha256"]) == 64
    assert recipe.embeddings[0]["towers"] == ["text_encoder", "text_encoder_2"]
    with pytest.raises(ValueError, match=r"textual-inversion embeddings <s>"):
        LatentDiffusionXLPipeline(**copy.deepcopy(fresh[0])).reproduce(tmp_path / "out.png", progress=False)


def test_the_second_towers_vectors_change_the_picture(base, fresh, tmp_path):
    state = pair(vectors=1)
    save_file(state, tmp_path / "a.safetensors")
    save_file({**state, "clip_g": -state["clip_g"]}, tmp_path / "b.safetensors")
    other = LatentDiffusionXLPipeline(**copy.deepcopy(fresh[0]))
    first = draw(base.load_textual_inversion(tmp_path / "a.safetensors", token="<s>"), "a <s> circle")
    second = draw(other.load_textual_inversion(tmp_path / "b.safetensors", token="<s>"), "a <s> circle")
    assert np.abs(first - second).max() > 0.01  # fails when clip_g is not loaded into text_encoder_2


def test_diffusers_way_one_tower_at_a_time_and_a_refiner_takes_clip_g(base, refiner, fresh,
                                                                     tmp_path):
    state = pair(vectors=1, seed=3)
    base.load_textual_inversion(state["clip_l"], token="<s>", text_encoder=base.text_encoder,
                                tokenizer=base.tokenizer)
    base.load_textual_inversion(state["clip_g"], token="<s>", text_encoder=base.text_encoder_2,
                                tokenizer=base.tokenizer_2)
    assert base.embeddings["<s>"]["towers"] == ["text_encoder", "text_encoder_2"]
    close(draw(base, "a <s> circle"), diffusers_ti_draw(fresh[0], state, "<s>"))
    save_file(state, tmp_path / "shape.safetensors")
    refiner.load_textual_inversion(tmp_path / "shape.safetensors", token="<s>")
    picture = PIL.Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype(np.uint8))
    mine = draw(refiner, "a <s> circle", image=picture, strength=0.6)
    close(mine, diffusers_ti_draw(fresh[1], state, "<s>", cls=StableDiffusionXLImg2ImgPipeline, config=REFINER,
                                  image=picture, strength=0.6))


def test_files_of_the_other_kind_are_refused_naming_what_is_accepted(base, pipe, tmp_path):
    save_file({"<sd>": torch.zeros(2, 32)}, tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match=r"`text_encoder`: got none, with an embedding of one set of vectors "
                                         r"\(\(2, 32\)\) for a model with two text encoders; say which tower .*"
                                         r"pipe.text_encoder \(32 wide\), pipe.text_encoder_2 \(24 wide\)"):
        base.load_textual_inversion(tmp_path / "sd.safetensors")
    assert base.embeddings == {} and "<sd>" not in base.tokenizer.get_vocab()
    base.load_textual_inversion(tmp_path / "sd.safetensors", text_encoder=base.text_encoder, tokenizer=base.tokenizer)
    assert base.embeddings["<sd>"]["towers"] == ["text_encoder"] and "<sd>" not in base.tokenizer_2.get_vocab()
    save_file(pair(), tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match=r"`pretrained_model_name_or_path`: an SDXL embedding \(clip_l and clip_g, "
                                         r"one set per tower\) for a model with one text encoder; load a one-set"):
        pipe.load_textual_inversion(tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match=r"`text_encoder`: got a CLIPTextModel that is not this pipeline's; pass "
                                         r"pipe.text_encoder, pipe.text_encoder_2, or leave it out"):
        base.load_textual_inversion(tmp_path / "xl.safetensors", text_encoder=pipe.text_encoder)
    with pytest.raises(ValueError, match=r"`text_encoder`: is pipe.text_encoder_2, and `tokenizer` is text_encoder's"):
        base.load_textual_inversion(tmp_path / "xl.safetensors", text_encoder=base.text_encoder_2,
                                    tokenizer=base.tokenizer)
    with pytest.raises(ValueError, match=r"this text encoder takes 24"):  # widths swapped: nothing changes
        base.load_textual_inversion({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 32)}, token="<w>")
    assert "<w>" not in base.tokenizer.get_vocab() and "<w>" not in base.tokenizer_2.get_vocab()


def test_the_api_embeddings_folder_loads_sdxl_pairs_with_both_towers_widths(base, refiner, tmp_path):
    from ldm_pipeline.apps.api_config import load_embeddings

    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 24)}, folder / "pair.safetensors")
    loaded, skipped = load_embeddings(base, folder, allow_pickle=False)
    assert skipped == {} and (loaded["pair"]["shape"], loaded["pair"]["vectors"]) == (32 + 24, 2)
    loaded, skipped = load_embeddings(refiner, folder, allow_pickle=False)  # the refiner takes clip_g
    assert skipped == {} and loaded["pair"]["shape"] == 24

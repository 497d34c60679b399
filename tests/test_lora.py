"""LoRA adapters: diffusers parity, kohya keys, weights, fusing, unloading, and the traps around them."""

import copy
import re
import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ldm_pipeline import LatentDiffusionPipeline, read_recipe

KW = dict(num_inference_steps=4, height=16, width=16, output_type="np", guidance_scale=3.0)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(components, folder, text_encoder=True, seed=1, alpha=4, unet_targets=UNET_TARGETS):
    """A random LoRA trained by nobody, saved with diffusers' own save_lora_weights."""
    torch.manual_seed(seed)
    source = copy.deepcopy(components)
    unet_config = LoraConfig(r=4, lora_alpha=alpha, target_modules=unet_targets, init_lora_weights=False)
    source["unet"].add_adapter(unet_config)
    layers = dict(unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(source["unet"])))
    if alpha != 4:  # diffusers keeps lora_alpha only in the file's metadata
        layers["unet_lora_adapter_metadata"] = unet_config.to_dict()
    if text_encoder:
        text_config = LoraConfig(r=4, lora_alpha=alpha, target_modules=TEXT_TARGETS, init_lora_weights=False)
        source["text_encoder"].add_adapter(text_config)
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(source["text_encoder"]))
        if alpha != 4:
            layers["text_encoder_lora_adapter_metadata"] = text_config.to_dict()
    StableDiffusionPipeline.save_lora_weights(folder, **layers)
    return folder


def to_kohya(diffusers_file, kohya_file):
    """Rename a diffusers-format LoRA's keys the way kohya's scripts write them (alpha = rank: scale 1)."""
    state, out = load_file(diffusers_file), {}
    for key, tensor in state.items():
        kind, _, rest = key.partition(".")
        module, _, which = rest.partition(".lora_linear_layer.")
        if not which:
            module, _, which = rest.partition(".lora.")
        prefix = "lora_unet_" if kind == "unet" else "lora_te_text_model_"
        name = prefix + module.replace(".", "_")
        out[f"{name}.lora_{'down' if which.startswith('down') else 'up'}.weight"] = tensor
        if which.startswith("down"):
            out[f"{name}.alpha"] = torch.tensor(float(tensor.shape[0]))
    save_file(out, kohya_file)
    return kohya_file


def draw(pipe, prompt="a red circle", seed=0):
    return pipe(prompt, seed=seed, progress=False, **KW).images


def diffusers_draw(components, folder=None, weight=None):
    pipe = StableDiffusionPipeline(**copy.deepcopy(components), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.load_lora_weights(folder, adapter_name="style")
        if weight is not None:
            pipe.set_adapters("style", weight)
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), **KW).images


def lora_layers(pipe):
    """peft's LoRA layers of the UNet and the text encoder, by (model, module path)."""
    return {(kind, name): layer for kind, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))
            for name, layer in model.named_modules() if hasattr(layer, "lora_A")}


def base_weights(pipe):
    """The weights under each LoRA layer (what fusing adds to), copied to the CPU."""
    return {key: layer.get_base_layer().weight.detach().to("cpu", copy=True)
            for key, layer in lora_layers(pipe).items()}


def assert_fused(pipe, before, lora_scale, adapter="default_0"):
    """Every LoRA layer has merged `adapter`, and its base weight is the one from `before` plus
    lora_scale x the adapter's weight x B A alpha / r, worked out here from the layer's own A and B."""
    layers, weight_of = lora_layers(pipe), {lora["name"]: lora["scale"] for lora in pipe.lora_info()}
    assert layers.keys() == before.keys() and len(layers) == sum(lora["modules"] for lora in pipe.lora_info())
    for key, layer in layers.items():
        assert layer.merged and layer.merged_adapters == [adapter], key
        down, up = layer.lora_A[adapter].weight.detach().cpu(), layer.lora_B[adapter].weight.detach().cpu()
        delta = up @ down * (layer.lora_alpha[adapter] / layer.r[adapter]) * weight_of[adapter] * lora_scale
        fused = layer.get_base_layer().weight.detach().cpu()
        torch.testing.assert_close(fused, before[key] + delta, atol=1e-5, rtol=1e-4, msg=str(key))
        assert torch.equal(fused, before[key]) == (lora_scale == 0), key


def assert_unfused(pipe, before):
    """No LoRA layer is merged, and the weights under them are exactly those from `before`."""
    layers = lora_layers(pipe)
    assert layers.keys() == before.keys()
    for key, layer in layers.items():
        assert not layer.merged and layer.merged_adapters == [], key
        assert torch.equal(layer.get_base_layer().weight.detach().cpu(), before[key]), key


@pytest.fixture
def pristine(_session_components):
    """Components no test has put a LoRA on (the `pipe` fixture shares `components`' models)."""
    return copy.deepcopy(_session_components)


@pytest.fixture
def lora(pristine, tmp_path):
    return make_lora(pristine, tmp_path / "lora")


def test_a_lora_saved_by_diffusers_draws_the_same_pixels_in_ours_and_in_diffusers(pristine, pipe, lora):
    base = draw(pipe)
    pipe.load_lora_weights(lora, adapter_name="style")
    ours = draw(pipe)
    assert np.abs(ours - base).max() > 0.01  # it does something
    np.testing.assert_array_equal(ours, diffusers_draw(pristine, lora))
    assert pipe.get_active_adapters() == ["style"] and pipe.lora_info()[0]["modules"] == 40


def test_lora_alpha_in_the_file_metadata_is_read_as_diffusers_reads_it(pristine, pipe, tmp_path):
    folder = make_lora(pristine, tmp_path / "alpha8", alpha=8)
    pipe.load_lora_weights(folder, adapter_name="style")
    ours = draw(pipe)
    np.testing.assert_array_equal(ours, diffusers_draw(pristine, folder))
    plain = make_lora(pristine, tmp_path / "alpha4", alpha=4)  # the same weights at half the scale
    pipe.unload_lora_weights().load_lora_weights(plain, adapter_name="style")
    assert np.abs(draw(pipe) - ours).max() > 0.01


def test_set_adapters_weights_as_diffusers_does(pristine, pipe, lora):
    base = draw(pipe)
    pipe.load_lora_weights(lora, adapter_name="style")
    pipe.set_adapters("style", 0.5)
    np.testing.assert_array_equal(draw(pipe), diffusers_draw(pristine, lora, 0.5))
    pipe.set_adapters("style", 0.0)
    np.testing.assert_allclose(draw(pipe), base, atol=1e-6)
    pipe.set_adapters([])  # none acts
    np.testing.assert_allclose(draw(pipe), base, atol=1e-6)


def test_load_scale_is_the_weight(pipe, lora):
    pipe.load_lora_weights(lora, adapter_name="a", scale=0.5)
    halved = draw(pipe)
    pipe.set_adapters("a", 1.0)
    assert np.abs(draw(pipe) - halved).max() > 0.01
    pipe.set_adapters("a", 0.5)
    np.testing.assert_array_equal(draw(pipe), halved)


def test_kohya_keys_give_the_same_pixels_as_the_diffusers_file(pristine, pipe, lora, tmp_path):
    pipe.load_lora_weights(lora)
    expected = draw(pipe)
    other = LatentDiffusionPipeline(**copy.deepcopy(pristine))
    kohya = to_kohya(lora / "pytorch_lora_weights.safetensors", tmp_path / "style.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every kohya module is used: no warning
        other.load_lora_weights(kohya)
    np.testing.assert_allclose(draw(other), expected, atol=1e-6)


def test_keys_that_adapt_nothing_are_named(pipe, lora, tmp_path):
    state = load_file(lora / "pytorch_lora_weights.safetensors")
    state["unet.no_such_block.to_q.lora_linear_layer.down.weight"] = torch.zeros(4, 32)
    state["unet.no_such_block.to_q.lora_linear_layer.up.weight"] = torch.zeros(32, 4)
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.warns(UserWarning, match=r"1 of its 41 modules .* not used: unet\.no_such_block\.to_q"):
        pipe.load_lora_weights(tmp_path / "extra.safetensors")


def test_fuse_unfuse_and_unload(pipe, lora):
    base = draw(pipe)
    pipe.load_lora_weights(lora)
    unfused, weights = draw(pipe), base_weights(pipe)
    pipe.fuse_lora()
    assert_fused(pipe, weights, 1.0)  # the weights changed: not the unmerged adapter drawing the same pixels
    np.testing.assert_allclose(draw(pipe), unfused, atol=1e-4)
    with pytest.raises(ValueError, match="fused"):
        pipe.set_adapters("default_0", 0.5)
    pipe.unfuse_lora()
    assert_unfused(pipe, weights)
    np.testing.assert_allclose(draw(pipe), unfused, atol=1e-4)
    pipe.set_adapters("default_0", 0.5)
    half = draw(pipe)
    pipe.set_adapters("default_0", 1.0).fuse_lora(lora_scale=0.5)
    assert_fused(pipe, weights, 0.5)
    np.testing.assert_allclose(draw(pipe), half, atol=1e-4)
    pipe.unfuse_lora()  # back to the adapter's own scale, 1
    assert_unfused(pipe, weights)
    np.testing.assert_allclose(draw(pipe), unfused, atol=1e-4)
    pipe.fuse_lora(lora_scale=0.0)  # fusing at 0 changes no weight
    assert_fused(pipe, weights, 0.0)
    np.testing.assert_allclose(draw(pipe), base, atol=1e-4)
    pipe.unfuse_lora().unload_lora_weights()
    np.testing.assert_allclose(draw(pipe), base, atol=1e-4)
    assert pipe.lora_info() == [] and not any("lora" in name for name, _ in pipe.unet.named_modules())


def test_a_text_encoder_lora_never_reads_a_stale_cached_embedding(pipe, lora):
    base = pipe.encode_prompt("a red circle")
    draw(pipe)  # the prompt and "" are now in the pipeline's embedding cache
    pipe.load_lora_weights(lora, adapter_name="style")
    with_lora = pipe.embedding_cache.encode(pipe.tokenizer, pipe.text_encoder, ["a red circle"])
    assert (with_lora - base).abs().max() > 1e-3
    pipe.set_adapters("style", 0.0)
    torch.testing.assert_close(pipe.embedding_cache.encode(pipe.tokenizer, pipe.text_encoder, ["a red circle"]),
                               base)


def test_a_compiled_pipeline_runs_unfused_adapters_eagerly(pipe, lora):
    expected_base = draw(pipe)

    class Package:  # stands for a compiled package built without the LoRA
        def runner_for(self, unet, *shapes):
            return lambda *args, **kwargs: (torch.zeros(args[0].shape),)

    pipe.compiled = Package()
    assert np.abs(draw(pipe) - expected_base).max() > 0.01  # the stand-in runs: wrong on purpose
    pipe.load_lora_weights(lora)
    pipe.compiled = None
    eager = draw(pipe)
    pipe.compiled = Package()
    np.testing.assert_array_equal(draw(pipe), eager)  # the package is bypassed while the LoRA acts unfused


def test_fusing_is_seen_by_the_compiled_unet_and_the_model_hash(pipe, lora, monkeypatch):
    """peft merges through `.data`, which no version counter shows: a package or hash from before must not stay."""
    from ldm_pipeline.fast import compile as fast
    from ldm_pipeline.text.keys import GivenText, text_attentions

    def stand_in(frozen):
        """A stand-in "aot" package: the UNet as it was when the package was built (a real one bakes its
        weights in), taking (sample, timestep, the text's keys and values) as a real package does."""
        def run(inputs):
            given = GivenText(frozen, text_attentions(frozen))
            try:
                return [given(*inputs)]
            finally:
                given.restore()
        return run
    monkeypatch.setattr(fast, "flat_runner", stand_in)
    pipe.compile(batch=None, verbose=False)
    builds = []
    pipe.compiled._load_or_build = lambda unet, *args: builds.append(copy.deepcopy(unet)) or builds[-1]
    base, base_hash = draw(pipe), pipe.model_hash()
    pipe.load_lora_weights(lora)
    assert pipe.model_hash() == base_hash  # unfused adapters are listed apart, not part of the model
    unfused = draw(pipe)
    assert np.abs(unfused - base).max() > 0.01
    pipe.set_adapters("default_0", 0.0)  # no adapter acts: a package for these weights (LoRA layers idle)
    np.testing.assert_allclose(draw(pipe), base, atol=1e-4)
    pipe.set_adapters("default_0", 1.0).fuse_lora()
    np.testing.assert_allclose(draw(pipe), unfused, atol=1e-4)  # not a package built without the LoRA
    assert len(builds) == 3  # base, idle LoRA layers, fused (unfused adapters ran eagerly)
    assert pipe.model_hash() != base_hash
    pipe.unfuse_lora()
    assert pipe.model_hash() == base_hash
    pipe.set_adapters("default_0", 0.0)
    np.testing.assert_allclose(draw(pipe), base, atol=1e-4)  # unmerged weights: the idle package is right again
    assert len(builds) == 3


def test_a_failed_load_changes_nothing(pipe, pristine, tmp_path):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    modules = [type(m).__name__ for m in pipe.unet.modules()]
    # a LoRA for a wider model: shapes do not fit
    state = make_lora(pristine, tmp_path / "ok") / "pytorch_lora_weights.safetensors"
    bad = {k: (torch.zeros(v.shape[0], v.shape[1] * 2) if k.endswith("down.weight") else v)
           for k, v in load_file(state).items()}
    save_file(bad, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="does not fit this model.*nothing was changed"):
        pipe.load_lora_weights(tmp_path / "wide.safetensors")
    assert [type(m).__name__ for m in pipe.unet.modules()] == modules
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert pipe.lora_info() == []
    # not a LoRA at all: the UNet's own weights
    save_file({k: v.contiguous() for k, v in before.items()}, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match="path_or_folder"):
        pipe.load_lora_weights(tmp_path / "unet.safetensors")
    assert [type(m).__name__ for m in pipe.unet.modules()] == modules


def _lora_state(pipe):
    """What a load can change: each model's module types, tensors by name, peft configs and adapters per layer."""
    return {kind: ([type(m).__name__ for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()},
                   list(getattr(model, "peft_config", {})),
                   [(name, list(layer.lora_A), list(layer.active_adapters)) for name, layer in model.named_modules()
                    if hasattr(layer, "lora_A")])
            for kind, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))}


def _assert_same_state(before, after):
    for kind in before:
        types, tensors, configs, adapters = before[kind]
        assert after[kind][0] == types and after[kind][2] == configs and after[kind][3] == adapters, kind
        assert list(after[kind][1]) == list(tensors), kind
        assert all(torch.equal(tensors[k], v) for k, v in after[kind][1].items()), kind


@pytest.mark.parametrize("misfit, targets", [
    # the UNet refuses it part-way; diffusers itself takes the new adapter back out of the layers
    pytest.param("up_blocks", UNET_TARGETS, id="unet-refuses"),
    # the same, but it also adapts layers the first does not: only the rollback unwraps those again
    pytest.param("up_blocks", [*UNET_TARGETS, "ff.net.2"], id="unet-refuses-wider"),
    # the UNet takes all of it, then the text encoder refuses it: only a rollback can take it out of the UNet
    pytest.param("text_encoder", UNET_TARGETS, id="text-encoder-refuses"),
])
def test_a_failed_second_load_leaves_the_first_adapter_as_it_was(pipe, pristine, lora, tmp_path, misfit, targets):
    pipe.load_lora_weights(lora, adapter_name="style", scale=0.5)
    with_style = draw(pipe)
    info = pipe.lora_info()
    before = _lora_state(pipe)
    other = make_lora(pristine, tmp_path / "other", seed=2, unet_targets=targets) / "pytorch_lora_weights.safetensors"
    bad = {k: (torch.zeros(v.shape[0], v.shape[1] * 2) if k.endswith("down.weight") and misfit in k else v)
           for k, v in load_file(other).items()}  # some layers fit, others do not
    save_file(bad, tmp_path / "half.safetensors")
    with pytest.raises(ValueError, match="does not fit this model.*nothing was changed"):
        pipe.load_lora_weights(tmp_path / "half.safetensors", adapter_name="other")
    assert pipe.lora_info() == info and pipe.get_active_adapters() == ["style"]
    _assert_same_state(before, _lora_state(pipe))
    layers = [layer for _, model in (("u", pipe.unet), ("t", pipe.text_encoder)) for layer in model.modules()
              if hasattr(layer, "lora_A")]
    assert layers and all(list(layer.lora_A) == ["style"] for layer in layers)
    assert all(list(model.peft_config) == ["style"] for model in (pipe.unet, pipe.text_encoder))
    np.testing.assert_array_equal(draw(pipe), with_style)
    pipe.load_lora_weights(other, adapter_name="other")  # the name is free again
    assert pipe.get_active_adapters() == ["style", "other"]


@pytest.mark.parametrize("call, error, match", [
    (lambda p, f: p.load_lora_weights(f / "missing.safetensors"), FileNotFoundError, "path_or_folder.*missing"),
    (lambda p, f: p.load_lora_weights(f, weight_name="other.safetensors"), FileNotFoundError, "weight_name"),
    (lambda p, f: p.load_lora_weights(f, scale=float("inf")), ValueError, "scale.*inf"),
    (lambda p, f: p.load_lora_weights(f, scale="1"), TypeError, "scale"),
    (lambda p, f: p.load_lora_weights(3), TypeError, "path_or_folder.*int"),
    (lambda p, f: p.load_lora_weights(f, adapter_name="half"), ValueError, "adapter_name.*'half'.*another name"),
    (lambda p, f: p.load_lora_weights(f, adapter_name="v1.5"), ValueError, "adapter_name.*'v1.5'"),
    (lambda p, f: p.set_adapters("nope"), ValueError, r"adapter_names.*\['nope'\] not loaded"),
    (lambda p, f: p.fuse_lora(), ValueError, "no LoRA is loaded"),
])
def test_bad_lora_arguments(pipe, lora, call, error, match):
    with pytest.raises(error, match=match):
        call(pipe, lora)


def test_pickled_lora_needs_allow_pickle(pipe, lora, tmp_path):
    torch.save(load_file(lora / "pytorch_lora_weights.safetensors"), tmp_path / "style.bin")
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
        pipe.load_lora_weights(tmp_path / "style.bin")
    assert pipe.lora_info() == []
    pipe.load_lora_weights(tmp_path / "style.bin", allow_pickle=True)
    assert pipe.get_active_adapters() == ["default_0"]


def test_a_second_adapter_of_the_same_name_is_refused(pipe, lora):
    pipe.load_lora_weights(lora, adapter_name="style")
    with pytest.raises(ValueError, match="adapter_name.*'style' is already loaded"):
        pipe.load_lora_weights(lora, adapter_name="style")


def test_recipes_record_the_adapters_and_reproduce_checks_them(pipe, lora, tmp_path):
    pipe.load_lora_weights(lora, adapter_name="style", scale=0.7)
    output = pipe("a red circle", seed=4, progress=False, **{**KW, "output_type": "pil"})
    path = output.save(tmp_path / "lora.png")[0]
    recipe = read_recipe(path)
    assert [(l["name"], l["scale"]) for l in recipe.loras] == [("style", 0.7)]
    assert re.search(r'Lora hashes: "style: [0-9a-f]{12}"', recipe.parameters())
    again = pipe.reproduce(path, progress=False).images[0]
    assert np.array_equal(np.asarray(again), np.asarray(output.images[0]))
    pipe.set_adapters("style", 1.0)
    with pytest.raises(ValueError, match=r"style \([0-9a-f]{12}, scale 0.7\).*scale 1\)"):
        pipe.reproduce(path, progress=False)
    pipe.unload_lora_weights()
    with pytest.raises(ValueError, match="this pipeline has none"):
        pipe.reproduce(path, progress=False)


def test_ldm_generate_lora(pipe, lora, tmp_path, capsys):
    from ldm_pipeline.apps.cli import main

    model = tmp_path / "model"
    pipe.save_pretrained(model)
    common = ["generate", "a red circle", "--model", str(model), "--steps", "3", "--seed", "0", "--size", "16x16"]
    assert main([*common, "--out", str(tmp_path / "plain.png")]) == 0
    assert main([*common, "--lora", f"{lora}:0.5", "--out", str(tmp_path / "lora.png")]) == 0
    recipe = read_recipe(tmp_path / "lora.png")
    assert [(l["name"], l["scale"]) for l in recipe.loras] == [("lora", 0.5)]
    assert read_recipe(tmp_path / "plain.png").loras is None
    assert main([*common, "--lora", f"{tmp_path}/missing:2", "--out", str(tmp_path / "x.png")]) == 2
    assert "--lora" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_model_offload_with_adapters(pipe, lora):
    """Adapters loaded, weighed, fused and unloaded while the models are offloaded (on a GPU when there is one)."""
    device = "cuda" if torch.cuda.is_available() else "cpu:0"
    base = draw(pipe)
    pipe.load_lora_weights(lora, adapter_name="style")
    expected = draw(pipe)
    pipe.unload_lora_weights().enable_model_cpu_offload(device)
    pipe.load_lora_weights(lora, adapter_name="style")
    assert all(p.device.type == "cpu" for p in pipe.unet.parameters())  # at rest between calls
    np.testing.assert_allclose(draw(pipe), expected, atol=1e-3)
    assert np.abs(expected - base).max() > 0.01
    weights = base_weights(pipe)
    pipe.fuse_lora()
    assert_fused(pipe, weights, 1.0, adapter="style")
    np.testing.assert_allclose(draw(pipe), expected, atol=1e-3)
    pipe.unfuse_lora()
    assert_unfused(pipe, weights)
    pipe.unload_lora_weights()
    np.testing.assert_allclose(draw(pipe), base, atol=1e-3)
    pipe.disable_model_cpu_offload()


@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_a_few_step_lora_with_its_scheduler_draws_what_diffusers_draws(components, tmp_path, name):
    """An LCM-LoRA is a LoRA in diffusers' format: loaded with load_lora_weights, drawn with the lcm (or tcd)
    scheduler in a few steps at guidance 1, the pixels are diffusers' LCMScheduler + load_lora_weights."""
    from ldm_pipeline.sampling.schedulers import make_scheduler

    folder = make_lora(components, tmp_path / "lcm", text_encoder=False)
    pipe = LatentDiffusionPipeline(**copy.deepcopy(components)).set_scheduler(name)
    pipe.load_lora_weights(folder, adapter_name="lcm")
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, height=16, width=16)
    mine = pipe("a red circle", seed=0, progress=False, **kwargs).images
    theirs = StableDiffusionPipeline(**{**copy.deepcopy(components),
                                        "scheduler": make_scheduler(name, components["scheduler"].config)},
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(folder, adapter_name="lcm")
    reference = theirs("a red circle", generator=[torch.Generator().manual_seed(0)], **kwargs).images
    assert np.abs(np.asarray(mine[0], dtype=int) - np.asarray(reference[0], dtype=int)).max() <= 1
    assert pipe("a red circle", seed=0, progress=False, **kwargs).recipes()[0].scheduler == name
    with pytest.raises(ValueError, match=r"`num_inference_steps`: got 60; expected at most 50"):
        pipe("a red circle", num_inference_steps=60, progress=False)


def test_a_lora_named_by_hub_id_is_downloaded_and_an_unreachable_hub_is_a_clear_error(pipe, components, tmp_path,
                                                                                       monkeypatch):
    import huggingface_hub

    folder = make_lora(components, tmp_path / "hub", text_encoder=False)
    asked = []

    def download(repo, filename, **kwargs):
        asked.append((repo, filename))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    pipe.load_lora_weights("latent-consistency/lcm-lora-sdv1-5", adapter_name="lcm")
    assert asked == [("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors")]
    assert pipe.get_active_adapters() == ["lcm"]

    def unreachable(repo, filename, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(FileNotFoundError, match=r"`path_or_folder`: cannot load 'x.safetensors' of 'someone/nothing' "
                                                r"from the Hugging Face Hub \(OSError\)"):
        pipe.load_lora_weights("someone/nothing", weight_name="x.safetensors")

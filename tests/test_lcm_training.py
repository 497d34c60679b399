"""Latent consistency distillation: its pieces, and a few steps on the tiny model that give a LoRA the lcm
scheduler draws with."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file
import torch
from diffusers import DDPMScheduler

from ldm_pipeline import LatentDiffusionPipeline
from ldm_pipeline.training.lcm import (LcmConfig, boundary, edge_weights, lcm_loss, pseudo_huber, teacher_solve,
                                      x0_and_noise)
from ldm_pipeline.training.loop import LoopConfig
from ldm_pipeline.training.plan import read_stage, run_stage


def test_the_consistency_function_is_the_identity_at_t_0_and_the_estimate_late():
    c_skip, c_out = boundary(torch.tensor([0, 1, 999]))
    assert (c_skip[0].item(), c_out[0].item()) == (1.0, 0.0)  # f(x, 0) = x: the boundary condition
    assert c_skip[2].item() < 1e-6 and c_out[2].item() > 0.999  # late: the model's x_0 estimate alone


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_x0_and_noise_invert_the_forward_process(kind):
    scheduler = DDPMScheduler(prediction_type=kind)
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([10, 700])
    sample = scheduler.add_noise(x0, noise, t)
    output = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t), "sample": x0}[kind]
    got_x0, got_noise = x0_and_noise(output, sample, scheduler.alphas_cumprod[t].view(-1, 1, 1, 1), kind)
    torch.testing.assert_close(got_x0, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_noise, noise, atol=1e-3, rtol=1e-3)


def test_the_teacher_is_the_frozen_model_and_only_the_lora_learns(pipe):
    from ldm_pipeline.training.lora import _adapter_config

    unet = pipe.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.add_adapter(_adapter_config(4, 4, ["to_q", "to_k", "to_v", "to_out.0"]))
    unet.requires_grad_(False)
    for name, parameter in unet.named_parameters():
        parameter.requires_grad_("lora_" in name)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    config = LcmConfig(loop=LoopConfig(output_dir="unused", steps=1, batch_size=2), solver_steps=10)
    generator = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    loss = lcm_loss(unet, scheduler, latents, context, torch.zeros(1, 77, 32), config, generator)
    loss.backward()
    grads = {n for n, p in unet.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n for n in grads)
    unet.disable_adapters()  # the adapters off: the original weights, untouched
    base = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], v) for k, v in before.items())


def test_the_one_step_target_is_the_teachers_own_ddim_image(pipe):
    """teacher_solve is guided DDIM on the grid 999, 749, 499, 249 down to x_0: the pipeline with DDIM's
    trailing spacing draws the same latents from the same noise."""
    from diffusers import DDIMScheduler

    alpha_bars = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["a red circle", "a blue square"]
    context, uncond = pipe.encode_prompt(prompts), pipe.encode_prompt([""])
    got = teacher_solve(pipe.unet, noise, context, uncond, torch.tensor(2.5), alpha_bars, "epsilon", 4)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                               set_alpha_to_one=True)
    want = pipe(prompts, latents=noise, num_inference_steps=4, guidance_scale=2.5, output_type="latent",
                progress=False).images
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_the_one_step_term_pulls_the_one_step_estimate_to_the_teachers_image(pipe):
    from ldm_pipeline.training.lora import _adapter_config

    unet = pipe.unet
    unet.add_adapter(_adapter_config(4, 4, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]))
    unet.requires_grad_(False)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for parameter in params:
        parameter.requires_grad_(True)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    loop = LoopConfig(output_dir="unused", steps=1, batch_size=2)
    latents, context = torch.zeros(2, 4, 8, 8), torch.randn(2, 77, 32)
    uncond = torch.zeros(1, 77, 32)
    plain, both = (LcmConfig(loop=loop, solver_steps=4, one_step_weight=weight, one_step_batch=2)
                   for weight in (0.0, 1.0))
    loss = {}
    for name, config in (("plain", plain), ("both", both)):
        loss[name] = lcm_loss(unet, scheduler, latents, context, uncond, config, torch.Generator().manual_seed(0))
    assert loss["both"] > loss["plain"]  # the same consistency draw, plus a positive one-step distance

    def gap():  # the one-step term alone, on the noise that seed 1 draws
        with torch.no_grad():
            return (lcm_loss(unet, scheduler, latents, context, uncond, both, torch.Generator().manual_seed(1))
                    - lcm_loss(unet, scheduler, latents, context, uncond, plain, torch.Generator().manual_seed(1)))

    before = gap()
    optimizer = torch.optim.Adam(params, lr=3e-3)
    for _ in range(30):
        optimizer.zero_grad()
        lcm_loss(unet, scheduler, latents, context, uncond, both, torch.Generator().manual_seed(1)).backward()
        optimizer.step()
    assert gap() < 0.7 * before


def test_a_few_steps_give_a_lora_the_lcm_scheduler_draws_with(model, tmp_path):
    config = {"stage": "lcm", "model": str(model), "data": "shapes", "rank": 4, "solver_steps": 10,
              "dataset_size": 16, "loop": {"output_dir": "{run}/lcm", "steps": 3, "batch_size": 4,
                                           "learning_rate": 0.001, "checkpoint_every": 2}}
    path = tmp_path / "lcm.json"
    path.write_text(json.dumps(config))
    stage, parsed = read_stage(path, tmp_path / "run")
    assert stage == "lcm" and parsed.solver_steps == 10
    out = run_stage(path, tmp_path / "run", progress=False)
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "training.json").read_text())["scheduler"] == "lcm"
    keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
    for layer in ("attn2.to_k", "resnets.0.conv1", "resnets.0.time_emb_proj"):  # convolutions too: sharp 1-step
        assert any(f".{layer}.lora" in key for key in keys), layer
    pipe = LatentDiffusionPipeline.from_pretrained(str(model)).set_scheduler("lcm")
    plain = pipe("a red circle", seed=0, num_inference_steps=2, guidance_scale=1.0, progress=False).images[0]
    pipe.load_lora_weights(out, adapter_name="lcm")
    fast = pipe("a red circle", seed=0, num_inference_steps=2, guidance_scale=1.0, progress=False).images[0]
    assert fast.size == plain.size and not np.array_equal(np.asarray(fast), np.asarray(plain))


def test_the_one_step_distance_can_be_taken_after_decoding(pipe):
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    loop = LoopConfig(output_dir="unused", steps=1, batch_size=2)
    latents, context, uncond = torch.zeros(2, 4, 8, 8), torch.randn(2, 77, 32), torch.zeros(1, 77, 32)
    plain, both = (LcmConfig(loop=loop, solver_steps=4, one_step_weight=weight) for weight in (0.0, 1.0))

    def term(decode):
        run = (lcm_loss(pipe.unet, scheduler, latents, context, uncond, config, torch.Generator().manual_seed(0),
                        decode) for config in (both, plain))
        return next(run) - next(run)

    latent = term(None)
    assert torch.allclose(term(lambda z: 3 * z), 3 * latent, rtol=1e-3)  # the distance of what decode gives
    decoded = []
    term(lambda z: decoded.append(z.requires_grad) or pipe.vae.decode(z).sample)
    assert decoded == [False, True]  # the teacher's image without gradient, the student's with
    with pytest.raises(ValueError, match="`one_step_space`: got 'rgb'"):
        LcmConfig(loop=loop, one_step_space="rgb")


def test_the_edge_weights_mark_both_sides_of_every_edge_and_nothing_flat():
    image = torch.zeros(2, 3, 12, 12)
    image[0, 0, 3:7, 3:7] = 1.0  # a red square: an edge in one channel only
    image[1, :, 5:, :] = 0.25  # a faint horizontal edge
    weights = edge_weights(image, 4.0)
    assert weights.shape == (2, 1, 12, 12)
    square = weights[0, 0]
    for rim in (square[2, 3:7], square[3, 3:7], square[6, 3:7], square[7, 3:7], square[3:7, 2], square[3:7, 7]):
        assert rim.min() >= 5 - 1e-6  # both sides of each edge, in full
    assert square[4:6, 4:6].eq(1).all() and square[:2].eq(1).all() and square[:, 8:].eq(1).all()
    assert weights[1, 0, 4:6].min() >= 5 - 1e-6 and weights[1, 0, :4].eq(1).all()  # scaled by each image's peak
    assert edge_weights(torch.ones(1, 3, 5, 5), 4.0).eq(1).all()


def test_the_one_step_distance_weighs_edges_when_asked(pipe):
    a, b = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    b[..., 0, 0] = 1.0
    weights = torch.ones(1, 1, 4, 4)
    weights[..., 0, 0] = 3.0
    assert torch.isclose(pseudo_huber(a, b, 1e-3, weights), pseudo_huber(a, b, 1e-3) * 16 * 3 / 18, rtol=1e-4)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    loop = LoopConfig(output_dir="unused", steps=1, batch_size=2)
    latents, context, uncond = torch.zeros(2, 4, 8, 8), torch.randn(2, 77, 32), torch.zeros(1, 77, 32)
    losses = [lcm_loss(pipe.unet, scheduler, latents, context, uncond,
                       LcmConfig(loop=loop, solver_steps=4, one_step_weight=1.0, one_step_edges=edges),
                       torch.Generator().manual_seed(0)) for edges in (0.0, 0.0, 8.0)]
    assert losses[0] == losses[1] and losses[2] != losses[0]
    with pytest.raises(ValueError, match=r"`one_step_edges`: got -1"):
        LcmConfig(loop=loop, one_step_edges=-1)


def test_a_distillation_can_start_from_a_lora_it_wrote(pipe, tmp_path):
    from ldm_pipeline.training.lcm import start_from
    from ldm_pipeline.training.lora import _adapter_config, save_lora

    targets = ["to_q", "to_k", "conv1"]
    pipe.unet.add_adapter(_adapter_config(4, 4, targets))
    for name, parameter in pipe.unet.named_parameters():
        if "lora_" in name:
            parameter.data.normal_()
    written = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "lora_" in k}
    save_lora(pipe.unet, None, tmp_path / "first")
    fresh = type(pipe.unet).from_config(pipe.unet.config)
    fresh.add_adapter(_adapter_config(4, 4, targets))
    start_from(fresh, tmp_path / "first")
    loaded = {k: v for k, v in fresh.state_dict().items() if "lora_" in k}
    assert loaded.keys() == written.keys() and all(torch.equal(loaded[k], written[k]) for k in written)
    other = type(pipe.unet).from_config(pipe.unet.config)
    other.add_adapter(_adapter_config(8, 8, targets))
    with pytest.raises(ValueError, match="`init_lora`: .* does not fit this adapter"):
        start_from(other, tmp_path / "first")
    with pytest.raises(FileNotFoundError, match="`init_lora`"):
        start_from(other, tmp_path / "none")


def test_bad_settings_are_named():
    loop = LoopConfig(output_dir="unused", steps=1)
    with pytest.raises(ValueError, match=r"`w_min`, `w_max`: got 3, 2"):
        LcmConfig(loop=loop, w_min=3, w_max=2)
    with pytest.raises(ValueError, match=r"`solver_steps`: got 0"):
        LcmConfig(loop=loop, solver_steps=0)
    with pytest.raises(ValueError, match=r"`one_step_weight`: got -1"):
        LcmConfig(loop=loop, one_step_weight=-1)
    with pytest.raises(ValueError, match=r"`one_step_batch`: got 0"):
        LcmConfig(loop=loop, one_step_batch=0)

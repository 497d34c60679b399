"""The adversarial term of the distillation: each player's gradient reaches only that player, the
discriminator learns to tell sharp from soft, and a distillation with the term trains and resumes."""

import json

import pytest
import torch
from diffusers import DDPMScheduler

from ldm_pipeline.training.adversarial import PatchDiscriminator, hinge_losses
from ldm_pipeline.training.lcm import LcmConfig, lcm_loss
from ldm_pipeline.training.loop import LoopConfig
from ldm_pipeline.training.plan import run_stage


def squares(count: int, soft: bool) -> torch.Tensor:
    """Grey 32x32 images with a white square; `soft`: its edges box-blurred."""
    images = torch.full((count, 3, 32, 32), -0.2)
    for i in range(count):
        y, x = 4 + 3 * i % 12, 6 + 5 * i % 10
        images[i, :, y:y + 12, x:x + 12] = 1.0
    if soft:
        images = torch.nn.functional.avg_pool2d(images, 5, stride=1, padding=2, count_include_pad=False)
    return images


def test_each_players_gradient_reaches_only_that_player():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(width=8).eval()  # eval: spectral norm's power iteration holds still
    real, fake = squares(2, soft=False), squares(2, soft=True).requires_grad_()
    assert discriminator(real).shape == (2, 1, 4, 4)

    def gradients(which):
        discriminator.zero_grad()
        fake.grad = None
        student, critic = hinge_losses(discriminator, real, fake)
        {"student": student, "critic": critic, "both": student + critic}[which].backward()
        return fake.grad, [p.grad for p in discriminator.parameters()]

    fake_both, critic_both = gradients("both")
    fake_student, critic_student = gradients("student")
    _, critic_alone = gradients("critic")
    assert torch.equal(fake_both, fake_student) and fake_both.abs().sum() > 0
    assert all(g is None for g in critic_student)  # the student's loss leaves the discriminator alone
    assert all(torch.allclose(a, b) for a, b in zip(critic_both, critic_alone))


def test_the_discriminator_learns_to_tell_sharp_from_soft():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(width=8)
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=2e-3)
    real, fake = squares(8, soft=False), squares(8, soft=True)
    for _ in range(60):
        _, critic = hinge_losses(discriminator, real, fake)
        optimizer.zero_grad()
        critic.backward()
        optimizer.step()
    held_out_real, held_out_fake = squares(12, soft=False)[8:], squares(12, soft=True)[8:]
    with torch.no_grad():
        assert discriminator(held_out_real).mean() > discriminator(held_out_fake).mean() + 0.5


def test_the_term_enters_the_loss_and_trains_the_discriminator(pipe):
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    loop = LoopConfig(output_dir="unused", steps=1, batch_size=2)
    latents, context, uncond = torch.zeros(2, 4, 8, 8), torch.randn(2, 77, 32), torch.zeros(1, 77, 32)
    decode = lambda z: pipe.vae.decode(z).sample
    discriminator = PatchDiscriminator(channels=3, width=8)
    losses, metrics = [], {}
    for weight in (0.0, 1.0):
        config = LcmConfig(loop=loop, solver_steps=4, one_step_weight=1.0, one_step_space="pixel",
                           adversarial_weight=weight)
        losses.append(lcm_loss(pipe.unet, scheduler, latents, context, uncond, config,
                               torch.Generator().manual_seed(0), decode, discriminator, metrics))
    assert losses[0] != losses[1] and set(metrics) == {"adversarial", "critic"}
    losses[1].backward()
    weights = [p for name, p in discriminator.named_parameters() if "weight" in name]  # (the last bias: -1 + 1)
    assert len(weights) == 4 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in weights)


def test_bad_adversarial_settings_are_named():
    loop = LoopConfig(output_dir="unused", steps=1)
    with pytest.raises(ValueError, match=r"`adversarial_weight`: got -1"):
        LcmConfig(loop=loop, adversarial_weight=-1)
    with pytest.raises(ValueError, match=r"`adversarial_weight`: got 0.1 .* expected `one_step_weight` > 0"):
        LcmConfig(loop=loop, adversarial_weight=0.1, one_step_weight=1.0, one_step_space="latent")
    with pytest.raises(ValueError, match=r"`adversarial_weight`: got 0.1"):
        LcmConfig(loop=loop, adversarial_weight=0.1, one_step_space="pixel")


def test_a_distillation_with_the_term_checkpoints_and_resumes_its_discriminator(model, tmp_path):
    config = {"stage": "lcm", "model": str(model), "data": "shapes", "rank": 4, "solver_steps": 4,
              "dataset_size": 8, "one_step_weight": 1.0, "one_step_batch": 2, "one_step_space": "pixel",
              "adversarial_weight": 0.5,
              "loop": {"output_dir": "{run}/lcm", "steps": 2, "batch_size": 2, "learning_rate": 0.001,
                       "checkpoint_every": 1}}
    path = tmp_path / "lcm.json"
    path.write_text(json.dumps(config))
    run_stage(path, tmp_path / "run", progress=False)
    checkpoint = torch.load(tmp_path / "run/lcm/checkpoints/step-0000002.pt", weights_only=False)
    assert set(checkpoint["models"]) == {"unet", "discriminator"}
    log = [json.loads(line) for line in (tmp_path / "run/lcm/log.jsonl").read_text().splitlines()]
    assert "critic" in log[-1] and "adversarial" in log[-1]
    config["loop"]["steps"] = 3
    path.write_text(json.dumps(config))
    out = run_stage(path, tmp_path / "run", resume=True, progress=False)
    assert json.loads((out / "training.json").read_text())["adversarial_weight"] == 0.5


def test_the_loop_scales_a_models_learning_rate(tmp_path):
    from ldm_pipeline.training.loop import train

    torch.manual_seed(0)
    models = {"slow": torch.nn.Linear(4, 1, bias=False), "fast": torch.nn.Linear(4, 1, bias=False)}
    before = {k: m.weight.detach().clone() for k, m in models.items()}
    config = LoopConfig(output_dir=str(tmp_path / "run"), steps=1, learning_rate=1e-3, warmup_steps=0,
                        weight_decay=0.0, checkpoint_every=1)

    def loss_fn(models, step, generator, rank, world):
        return sum(m(torch.ones(1, 4)).sum() for m in models.values()), {}

    trained = train(config, models, loss_fn, progress=False, lr_scales={"fast": 10.0})
    moved = {k: (m.weight.detach() - before[k]).abs() for k, m in trained.items()}  # Adam's first step: lr each
    torch.testing.assert_close(moved["slow"], torch.full((1, 4), 1e-3), rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(moved["fast"], torch.full((1, 4), 1e-2), rtol=1e-3, atol=1e-6)

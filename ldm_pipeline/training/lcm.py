"""Latent consistency distillation into a LoRA (Luo et al. 2023, "Latent Consistency Models"; LCM-LoRA):
a few-step (down to one-step) sampler for a model, trained against the model itself.

The frozen model is the teacher; the student is the same UNet with a LoRA, the only weights that
train. Each step, for clean latents x_0 of a captioned image:
1. a timestep t on the solver's grid of `solver_steps` points (t = (n + 1) k - 1, k = 1000 / solver_steps,
   the grid `LCMScheduler` samples with) and x_t = q(x_t | x_0);
2. the teacher (adapters off) with classifier-free guidance at a scale w drawn from [w_min, w_max]
   predicts x_0 and the noise; one DDIM step takes x_t to x_{t-k} (the skipping-step solver);
3. the consistency function f(x, t) = c_skip(t) x + c_out(t) x̂_0(x, t) (boundary conditions: f is the
   identity at t = 0) is evaluated by the student at (x_t, t), and, without gradient, at
   (x_{t-k}, t-k): the target (a stop-gradient target network, as in LCM-LoRA);
4. the loss is the pseudo-Huber distance between the two.

Optionally (`one_step_weight` > 0), a one-step term: for `one_step_batch` of the captions, pure noise at
the last grid point is taken by the teacher's own DDIM solve along the whole grid (`solver_steps` guided
steps, deterministic) to an image, and the student's single estimate f(noise, T) learns that image. The
consistency loss alone reaches the one-step estimate only through every grid point, and its errors
add up there (the bundled model's 1-step shapes came out with soft edges); this term asks for the
image the 1-step sampler must draw. `one_step_edges` weighs that distance more on the target's edges
(`edge_weights`), where a small shape is a few pixels of edge on a large flat ground.

The result is a LoRA folder in diffusers' format that `pipe.load_lora_weights` and diffusers read;
it draws with the `lcm` scheduler in 1 to 8 steps at guidance 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from . import data
from .adversarial import PatchDiscriminator, hinge_losses
from .loop import LoopConfig, train
from .lora import _adapter_config, check_targets, save_lora
from .unet import denoising_batch, encode_captions, encode_dataset

SIGMA_DATA = 0.5  # the boundary conditions' data scale
# The layers the LoRA adapts: attention, feed-forward, every convolution and the time embedding's
# projections (as LCM-LoRA does). Attention alone cannot sharpen a one-step image: the UNet's
# full-resolution blocks have none (measured on the bundled model: 1-step shapes came out rounded).
LCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
               "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
TIMESTEP_SCALING = 10.0  # LCM's scaling of t in the boundary conditions, so that they switch near t = 0


@dataclass
class LcmConfig:
    """What to distil, and how."""

    loop: LoopConfig
    data: str = "shapes"  # "shapes" or a folder with metadata.jsonl
    model: str | None = None  # the teacher: a folder or Hub id; None: the bundled model
    image_size: int | None = None  # default: the UNet's sample size times the VAE factor
    rank: int = 16
    alpha: float | None = None
    targets: list[str] | None = None  # the UNet layers the LoRA adapts (default LCM_TARGETS: those the UNet has)
    solver_steps: int = 50  # the DDIM grid (LCMScheduler's original_inference_steps)
    w_min: float = 1.0  # guidance scales the teacher is distilled at (w = 1: no guidance)
    w_max: float = 4.0
    huber_c: float = 0.001
    one_step_weight: float = 0.0  # weight of the one-step term (0: consistency distillation alone)
    one_step_batch: int = 8  # captions per step that train the one-step term
    one_step_space: str = "latent"  # where the one-step distance is taken: "latent" or "pixel" (VAE-decoded)
    one_step_edges: float = 0.0  # extra weight of the one-step distance on the target's edges (0: uniform)
    adversarial_weight: float = 0.0  # weight of the adversarial term on the one-step images (pixel space)
    discriminator_lr_scale: float = 10.0  # the discriminator's learning rate over the LoRA's
    init_lora: str | None = None  # start from this LoRA (a folder or .safetensors written by this stage)
    dataset_size: int = 20_000  # shapes scenes encoded once (ignored for a folder)

    def __post_init__(self):
        if not isinstance(self.solver_steps, int) or not 1 <= self.solver_steps <= 1000:
            raise ValueError(f"`solver_steps`: got {self.solver_steps!r}; expected an integer in [1, 1000]")
        if not (isinstance(self.w_min, (int, float)) and isinstance(self.w_max, (int, float))
                and 1 <= self.w_min <= self.w_max):
            raise ValueError(f"`w_min`, `w_max`: got {self.w_min!r}, {self.w_max!r}; expected 1 <= w_min <= w_max")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"`rank`: got {self.rank!r}; expected an integer >= 1")
        if not isinstance(self.huber_c, (int, float)) or self.huber_c <= 0:
            raise ValueError(f"`huber_c`: got {self.huber_c!r}; expected a number > 0")
        if not isinstance(self.one_step_weight, (int, float)) or self.one_step_weight < 0:
            raise ValueError(f"`one_step_weight`: got {self.one_step_weight!r}; expected a number >= 0")
        if not isinstance(self.one_step_batch, int) or isinstance(self.one_step_batch, bool) or self.one_step_batch < 1:
            raise ValueError(f"`one_step_batch`: got {self.one_step_batch!r}; expected an integer >= 1")
        if self.one_step_space not in ("latent", "pixel"):
            raise ValueError(f"`one_step_space`: got {self.one_step_space!r}; expected 'latent' or 'pixel'")
        if not isinstance(self.one_step_edges, (int, float)) or isinstance(self.one_step_edges, bool) \
                or self.one_step_edges < 0:
            raise ValueError(f"`one_step_edges`: got {self.one_step_edges!r}; expected a number >= 0")
        if not isinstance(self.adversarial_weight, (int, float)) or isinstance(self.adversarial_weight, bool) \
                or self.adversarial_weight < 0:
            raise ValueError(f"`adversarial_weight`: got {self.adversarial_weight!r}; expected a number >= 0")
        if not isinstance(self.discriminator_lr_scale, (int, float)) or isinstance(self.discriminator_lr_scale, bool) \
                or self.discriminator_lr_scale <= 0:
            raise ValueError(f"`discriminator_lr_scale`: got {self.discriminator_lr_scale!r}; expected a number > 0")
        if self.adversarial_weight > 0 and (self.one_step_weight <= 0 or self.one_step_space != "pixel"):
            raise ValueError(f"`adversarial_weight`: got {self.adversarial_weight!r} with `one_step_weight` "
                             f"{self.one_step_weight!r} and `one_step_space` {self.one_step_space!r}; the adversarial "
                             "term judges the one-step images: expected `one_step_weight` > 0 and "
                             "`one_step_space` 'pixel'")


def boundary(timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the consistency function at these timesteps, shaped (B, 1, 1, 1)."""
    scaled = timesteps.float() * TIMESTEP_SCALING
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + SIGMA_DATA ** 2) ** 0.5
    return c_skip.view(-1, 1, 1, 1), c_out.view(-1, 1, 1, 1)


def x0_and_noise(output: torch.Tensor, sample: torch.Tensor, alpha_bar: torch.Tensor, kind: str):
    """The clean latents and the noise a model output implies at a sample (epsilon, v or sample prediction)."""
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if kind == "epsilon":
        return (sample - s * output) / a, output
    if kind == "v_prediction":
        return a * sample - s * output, s * sample + a * output
    x0 = output
    return x0, (sample - a * x0) / s.clamp(min=1e-8)


def consistency(unet, sample, timesteps, context, alpha_bars, kind):
    """f(x, t) = c_skip x + c_out x̂_0, the student's estimate of x_0 from x at t."""
    output = unet(sample, timesteps, encoder_hidden_states=context).sample
    x0, _ = x0_and_noise(output, sample, alpha_bars[timesteps].view(-1, 1, 1, 1), kind)
    c_skip, c_out = boundary(timesteps)
    return c_skip * sample + c_out * x0


def guided(unet, sample, t, context, uncond, w, alpha_bars, kind):
    """The teacher's (adapters off) x_0 and noise at (sample, t) with classifier-free guidance at scale w."""
    batch = sample.shape[0]
    adapted = bool(getattr(unet, "peft_config", None))
    if adapted:
        unet.disable_adapters()  # the teacher: the frozen model itself
    try:
        outputs = unet(torch.cat([sample, sample]), torch.cat([t, t]),
                       encoder_hidden_states=torch.cat([uncond.expand_as(context), context])).sample
    finally:
        if adapted:
            unet.enable_adapters()
    a_t = alpha_bars[t].view(-1, 1, 1, 1)
    x0_u, eps_u = x0_and_noise(outputs[:batch], sample, a_t, kind)
    x0_c, eps_c = x0_and_noise(outputs[batch:], sample, a_t, kind)
    return x0_u + w * (x0_c - x0_u), eps_u + w * (eps_c - eps_u)


def ddim_step(x0, eps, alpha_bar_prev):
    """One DDIM step to the timestep whose cumulative alpha is `alpha_bar_prev`."""
    return alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev).sqrt() * eps


@torch.no_grad()
def teacher_solve(unet, noise, context, uncond, w, alpha_bars, kind, solver_steps: int) -> torch.Tensor:
    """The teacher's deterministic DDIM image from `noise` at the last grid point, down the whole grid
    (t = T, T - k, ..., k - 1): the x_0 estimate at the grid's first point."""
    k = len(alpha_bars) // solver_steps
    sample = noise
    for n in reversed(range(solver_steps)):
        t = torch.full((noise.shape[0],), (n + 1) * k - 1, dtype=torch.long)
        x0, eps = guided(unet, sample, t, context, uncond, w, alpha_bars, kind)
        if n:
            sample = ddim_step(x0, eps, alpha_bars[t - k].view(-1, 1, 1, 1))
    return x0


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The mean pseudo-Huber distance; with `weights` (broadcast to the inputs), their weighted mean."""
    distance = ((a.float() - b.float()) ** 2 + c ** 2).sqrt() - c
    if weights is None:
        return distance.mean()
    weights = weights.expand_as(distance)
    return (distance * weights).sum() / weights.sum()


def edge_weights(image: torch.Tensor, strength: float) -> torch.Tensor:
    """(B, 1, H, W) weights 1 + strength * e, where e in [0, 1] is each image's edge map: at each pixel, the
    largest per-channel difference to a neighbour (both pixels of a pair get it, so both sides of an edge
    do), over the image's largest. Flat regions weigh 1."""
    image = image.float()
    dx = (image[..., :, 1:] - image[..., :, :-1]).abs().amax(dim=1, keepdim=True)
    dy = (image[..., 1:, :] - image[..., :-1, :]).abs().amax(dim=1, keepdim=True)
    edges = torch.zeros_like(image[:, :1])
    for part, difference in ((edges[..., :, 1:], dx), (edges[..., :, :-1], dx),
                             (edges[..., 1:, :], dy), (edges[..., :-1, :], dy)):
        torch.maximum(part, difference, out=part)
    peak = edges.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
    return 1 + strength * edges / peak


def lcm_loss(unet, scheduler: DDPMScheduler, latents, context, uncond, config: LcmConfig,
             generator: torch.Generator, decode=None, discriminator=None, metrics: dict | None = None) -> torch.Tensor:
    """One latent-consistency-distillation loss on (B, C, h, w) latents and their (B, L, D) contexts
    (plus the one-step term when `config.one_step_weight` > 0; `decode`, latents -> pixels, takes its
    distance in pixels). With a `discriminator` and `config.adversarial_weight` > 0, the adversarial term
    and the discriminator's own hinge loss are added (so the sum is both players' loss) and their values
    go into `metrics` as "adversarial" and "critic"."""
    batch = latents.shape[0]
    k = scheduler.config.num_train_timesteps // config.solver_steps
    index = torch.randint(0, config.solver_steps, (batch,), generator=generator)
    t = (index + 1) * k - 1
    t_prev = (t - k).clamp(min=0)
    alpha_bars = scheduler.alphas_cumprod
    kind = scheduler.config.prediction_type
    noise = torch.randn(latents.shape, generator=generator)
    noisy = scheduler.add_noise(latents, noise, t)
    w = config.w_min + (config.w_max - config.w_min) * torch.rand(batch, generator=generator).view(-1, 1, 1, 1)
    prediction = consistency(unet, noisy, t, context, alpha_bars, kind)
    with torch.no_grad():
        x0, eps = guided(unet, noisy, t, context, uncond, w, alpha_bars, kind)
        previous = ddim_step(x0, eps, alpha_bars[t_prev].view(-1, 1, 1, 1))  # the skipping step, t -> t - k
        target = consistency(unet, previous, t_prev, context, alpha_bars, kind)
    loss = pseudo_huber(prediction, target, config.huber_c)
    if config.one_step_weight > 0:
        m = min(config.one_step_batch, batch)
        start = torch.randn((m, *latents.shape[1:]), generator=generator)
        last = torch.full((m,), config.solver_steps * k - 1, dtype=torch.long)
        image = teacher_solve(unet, start, context[:m], uncond, w[:m], alpha_bars, kind, config.solver_steps)
        one_step = consistency(unet, start, last, context[:m], alpha_bars, kind)
        if decode is not None:
            with torch.no_grad():
                image = decode(image)
            one_step = decode(one_step)
        weights = edge_weights(image, config.one_step_edges) if config.one_step_edges > 0 else None
        loss = loss + config.one_step_weight * pseudo_huber(one_step, image, config.huber_c, weights)
        if discriminator is not None and config.adversarial_weight > 0:
            student, critic = hinge_losses(discriminator, image, one_step)
            loss = loss + config.adversarial_weight * student + critic
            if metrics is not None:
                metrics.update(adversarial=student.item(), critic=critic.item())
    return loss


def present_targets(unet, targets: list[str]) -> list[str]:
    """The targets that name some linear or convolution layer of `unet` (a UNet without, say, shortcut
    convolutions adapts the rest)."""
    names = [name for name, module in unet.named_modules() if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    return [t for t in targets if any(name == t or name.endswith("." + t) for name in names)]


def start_from(unet, lora: str | Path) -> None:
    """Load a LoRA this stage wrote (same rank and targets) into `unet`'s adapter, before training on."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(lora)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"`init_lora`: {str(lora)!r} has no pytorch_lora_weights.safetensors; expected a "
                                "LoRA folder or file written by the lcm stage")
    state = {k.removeprefix("unet."): v for k, v in load_file(path).items() if k.startswith("unet.")}
    adapter = sum(1 for name, _ in unet.named_parameters() if "lora_" in name)
    try:
        result = set_peft_model_state_dict(unet, state, adapter_name="default")
    except RuntimeError as error:  # shapes that differ: another rank
        raise ValueError(f"`init_lora`: {str(lora)!r} does not fit this adapter ({error}); expected the "
                         "same rank and targets") from None
    if result.unexpected_keys or len(state) != adapter:
        raise ValueError(f"`init_lora`: {str(lora)!r} has {len(state)} LoRA tensors for an adapter of {adapter} "
                         f"(unexpected: {list(result.unexpected_keys)[:3]}); expected the same rank and targets")


def train_lcm(config: LcmConfig, resume: bool = False, progress: bool = True) -> Path:
    """Distil, write the LoRA to `output_dir/lcm-lora`, and return that folder."""
    from ..pipeline import LatentDiffusionPipeline

    dataset = data.open_dataset(config.data, length=config.dataset_size, seed=config.loop.seed)
    pipe = LatentDiffusionPipeline.from_pretrained(config.model, torch_dtype=torch.float32)
    unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    targets = config.targets or present_targets(unet, LCM_TARGETS)
    check_targets(unet, targets, "targets")
    for model in (unet, text_encoder, vae):
        model.requires_grad_(False).eval()
    size = config.image_size or unet.config.sample_size * pipe.vae_scale_factor
    means, stds, captions, _ = encode_dataset(vae, dataset, min(len(dataset), config.dataset_size), size)
    table = encode_captions(pipe.tokenizer, text_encoder, captions)  # row 0 is ""
    uncond = table[0][0:1]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    torch.manual_seed(config.loop.seed)
    unet.add_adapter(_adapter_config(config.rank, config.alpha, targets))
    if config.init_lora:
        start_from(unet, config.init_lora)

    def decode(latents):  # the frozen decoder; gradients flow to the student's latents
        return vae.decode(latents / vae.config.scaling_factor).sample

    decode = decode if config.one_step_space == "pixel" else None

    players = {"unet": unet}
    if config.adversarial_weight > 0:  # trains beside the LoRA; checkpointed with it, not saved after
        players["discriminator"] = PatchDiscriminator(channels=vae.config.out_channels)

    def loss_fn(models, step, generator, rank, world):
        latents, context = denoising_batch(means, stds, vae.config.scaling_factor, captions, table, None,
                                           config.loop, 0.0, step, generator, rank, world)
        metrics = {}
        loss = lcm_loss(models["unet"], scheduler, latents, context, uncond, config, generator, decode,
                        models.get("discriminator"), metrics)
        return loss, metrics

    trained = train(config.loop, players, loss_fn, resume=resume, progress=progress, name="lcm",
                    trainable_only=True, lr_scales={"discriminator": config.discriminator_lr_scale})
    out = save_lora(trained["unet"], None, Path(config.loop.output_dir) / "lcm-lora")
    (out / "training.json").write_text(json.dumps({
        "teacher": config.model or "bundled", "data": config.data, "rank": config.rank, "steps": config.loop.steps,
        "solver_steps": config.solver_steps, "one_step_weight": config.one_step_weight,
        "one_step_space": config.one_step_space, "one_step_edges": config.one_step_edges,
        "adversarial_weight": config.adversarial_weight, "discriminator_lr_scale": config.discriminator_lr_scale,
        "init_lora": config.init_lora, "targets": targets, "w": [config.w_min, config.w_max],
        "scheduler": "lcm"}, indent=2))
    return out

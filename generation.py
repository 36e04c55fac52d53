"""Prompts and seeds to images: the glue between models.py (family-specific) and sampling.py
(family-free), shared by training rollouts, annealed sampling, grids and metrics."""

from dataclasses import dataclass

import torch

import models
import sampling
import utils
from utils import UsageError


@dataclass(frozen=True)
class SamplerSettings:
    resolution: int
    num_steps: int
    guidance_scale: float
    eta: float = 0.0

    @classmethod
    def of(cls, cfg) -> "SamplerSettings":
        """From an entry script's config (its resolution already resolved)."""
        return cls(cfg.resolution, cfg.inference_steps, cfg.guidance_scale, cfg.eta)


def generate(
    model: models.DiffusionModel,
    prompts: list[str],
    seeds: list[int],
    settings: SamplerSettings,
    *,
    latent_dtype: torch.dtype = torch.float32,
    truncation_steps: int = 0,
    with_kl: bool = False,
    weighing: str | None = None,
    base_only: bool = False,
    lv_samples: int = 0,
    checkpoint_denoiser: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decoded images [B,3,H,W] in [0,1] (with the graph of the last `truncation_steps` steps) and
    the KL when asked. x_T of sample b depends on seeds[b] alone, so any batching or world size
    gives the same images. `weighing` draws an annealed mix; `base_only` the pretrained model."""
    device = model.unet.device
    conditioning = models.encode_prompts(model, prompts, sampling.uses_guidance(settings.guidance_scale),
                                         settings.resolution)
    gens = utils.generators(seeds, device)
    # Euler's init_noise_sigma depends on the timesteps, which the pipelines set before drawing x_T.
    model.scheduler.set_timesteps(settings.num_steps, device=device)
    shape = model.latent_shape(len(prompts), settings.resolution)
    x_T = sampling.initial_latents(shape, gens, model.scheduler, device, latent_dtype)
    base = models.base_denoiser(model, conditioning)
    tuned = base if base_only else models.tuned_denoiser(model, conditioning)
    trajectory = sampling.sample(
        tuned, model.scheduler, x_T, num_steps=settings.num_steps, guidance_scale=settings.guidance_scale,
        eta=settings.eta, generator=gens, truncation_steps=truncation_steps,
        base=base if (with_kl or weighing) else None,
        weighing=sampling.parse_weighing(weighing) if weighing else None,
        lv_samples=lv_samples, checkpoint_denoiser=checkpoint_denoiser,
    )
    return models.decode(model, trajectory.latents), trajectory.kl


def validate_sampler_flags(cfg) -> None:
    """The sampler flags every entry script shares: --inference-steps, --eta, --resolution."""
    utils.require_at_least_one(inference_steps=cfg.inference_steps)
    if cfg.eta < 0:
        raise UsageError(f"--eta must be >= 0, got {cfg.eta}")
    if cfg.resolution is not None and cfg.resolution < 8:
        raise UsageError(f"--resolution must be at least 8, got {cfg.resolution}")


def weighing_list(values) -> list[str]:
    """Validated weighing names, in order, each once."""
    try:
        return list(dict.fromkeys(sampling.split_weighings(list(values))))
    except ValueError as error:
        raise UsageError(str(error)) from None


def inference_dtype(choice: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on a GPU and fp32 on the CPU."""
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[choice]


def load_for_inference(model_name: str | None, checkpoint: str | None, device: torch.device, dtype: torch.dtype,
                       scheduler: str, resolution: int | None) -> tuple[models.DiffusionModel, int]:
    """The base pipeline (by default the one the checkpoint records, or SD 1.5 without a checkpoint)
    with the checkpoint's tuned weights on top when given; returns the model and the resolution."""
    name = model_name or (models.model_name(checkpoint) if checkpoint else models.DEFAULT_MODEL)
    if name is None:
        raise UsageError(f"checkpoint {checkpoint!r} does not record its base model; name it with --model")
    model = models.load_model(name, device, dtype, scheduler)
    if checkpoint:
        models.load_checkpoint_for_inference(model, checkpoint)
    return model, checked_resolution(model, resolution)


def checked_resolution(model: models.DiffusionModel, resolution: int | None) -> int:
    resolution = resolution or model.default_resolution()
    if resolution % model.pipe.vae_scale_factor:
        raise UsageError(f"--resolution {resolution} must be a multiple of {model.pipe.vae_scale_factor} for this model")
    return resolution

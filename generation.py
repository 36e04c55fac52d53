"""Prompts and seeds to images: the glue between models.py (family-specific) and sampling.py
(family-free), shared by training rollouts, annealed sampling, grids and metrics."""

from dataclasses import dataclass, field
from typing import Iterator, Literal, Mapping

import torch
from tqdm import tqdm

import models
import rewards
import sampling
import utils
from utils import UsageError

# ---------------------------------------------------------------------------------------------
# Options several entry scripts share, each defined once: a script's config inherits the groups it takes.


@dataclass(kw_only=True)
class SamplerOptions:
    inference_steps: int = 50  # sampler steps N
    guidance_scale: float = 7.5  # classifier-free guidance scale (1 turns guidance off)
    eta: float = 0.0  # DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like noise
    scheduler: Literal["ddim", "pipeline"] = "ddim"  # DDIM built from the pipeline's config, or the pipeline's own scheduler
    resolution: int | None = None  # image side in pixels; default from the model config (512 for SD 1.5)


@dataclass(kw_only=True)
class DeviceOption:
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA if there is one; each process takes the GPU of its LOCAL_RANK


@dataclass(kw_only=True)
class RewardSourceOption:
    reward_source: list[str] = field(default_factory=list)  # NAME=PATH: load reward NAME from a local folder/file


@dataclass(kw_only=True)
class InferenceOptions(SamplerOptions, DeviceOption):
    model: str | None = None  # base pipeline (hub id or folder); default: the one the checkpoint records, else SD 1.5
    seed: int = 0  # the noise of image (prompt p, repeat r) comes from (seed, p, r) alone, on any number of GPUs
    batch_size: int = 4  # images per denoiser call per process
    # diffusion weights and latents; auto = bfloat16 on GPU, float32 on CPU (scores are always computed in float32)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


def validate_shared_options(cfg) -> None:
    """The checks of the shared option groups a config has, and no float flag NaN or infinite."""
    utils.require_finite(cfg)
    if isinstance(cfg, SamplerOptions):
        utils.require_at_least_one(inference_steps=cfg.inference_steps)
        if cfg.eta < 0:
            raise UsageError(f"--eta must be >= 0, got {cfg.eta}")
        if cfg.resolution is not None and cfg.resolution < 8:
            raise UsageError(f"--resolution must be at least 8, got {cfg.resolution}")
    if isinstance(cfg, InferenceOptions):
        utils.require_at_least_one(batch_size=cfg.batch_size)
    if isinstance(cfg, RewardSourceOption):
        rewards.parse_reward_sources(cfg.reward_source)


# ---------------------------------------------------------------------------------------------
# Sampling


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


Job = tuple[int, int]  # (prompt index in its set, repeat)


def render_jobs(model: models.DiffusionModel, texts: Mapping[int, str], jobs: list[Job], settings: SamplerSettings,
                *, seed: int, weighing: str) -> torch.Tensor:
    """Images of (prompt p, repeat r) jobs as generate, anneal and metrics all draw them: the noise of
    (p, r) comes from (seed, p, r) alone, so any batching or number of GPUs gives the same images, and
    latents are in the weights' dtype."""
    seeds = [utils.derive_seed(seed, p, r) for p, r in jobs]
    images, _ = generate(model, [texts[p] for p, _ in jobs], seeds, settings, latent_dtype=model.unet.dtype,
                         weighing=weighing)
    return images


def render_batches(model: models.DiffusionModel, texts: Mapping[int, str], jobs: list[Job], weighings: list[str],
                   settings: SamplerSettings, *, seed: int, batch_size: int, desc: str,
                   show_bar: bool) -> Iterator[tuple[list[Job], str, torch.Tensor]]:
    """(batch, weighing, images) for every batch of `jobs` and every weighing, under a progress bar."""
    bar = tqdm(total=len(jobs) * len(weighings), disable=not show_bar, desc=desc, dynamic_ncols=True)
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        for weighing in weighings:
            yield batch, weighing, render_jobs(model, texts, batch, settings, seed=seed, weighing=weighing)
            bar.update(len(batch))
    bar.close()


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

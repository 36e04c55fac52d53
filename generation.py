"""Prompts and seeds to images: the glue between models.py (family-specific) and sampling.py
(family-free), shared by training rollouts, annealed sampling, grids and metrics."""

from dataclasses import dataclass, field, fields, replace
from typing import Annotated, Iterator, Literal, Mapping

import torch
import tyro
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
    inference_steps: int | None = None  # sampler steps N; default 50 (SD, SDXL), 40 (SD3, as FDFO), len(--sigmas)
    # classifier-free guidance scale (1 turns guidance off); default 7.5 (SD, SDXL), 4.5 (SD3; FDFO's no-CFG checkpoints need 1)
    guidance_scale: float | None = None
    # eta of DDIM (0 deterministic, 1 DDPM-like noise) and of cps (0 is the Euler step; RTDMD samples with 0.9); others ignore it
    eta: float = 0.0
    # ddim: DDIM built from the pipeline's config (SD, SDXL default); pipeline: its own (SD3 default: flow-match Euler with
    # its shift); cps: RTDMD's coefficients-preserving step on the flow-match schedule (SD3; with --eta, --sigmas)
    scheduler: Annotated[Literal["ddim", "pipeline", "cps"] | None, tyro.conf.arg(aliases=("--sampler",))] = None
    sigmas: tuple[float, ...] = ()  # cps only: the sigma schedule as given, already shifted, e.g. RTDMD's 1.0 0.9 0.75 0.5
    resolution: int | None = None  # image side in pixels; default from the model config (512 for SD 1.5); SD3 trains at 512


@dataclass(kw_only=True)
class TextEncoderOptions:
    max_sequence_length: int = 256  # SD3: T5 tokens of a prompt (the pipeline's default; FDFO trains with 128)
    no_t5: bool = False  # SD3: run without the T5 encoder (zeros in its place), as diffusers allows, for memory
    offload_text_encoders: bool = False  # keep the text encoders on the CPU except while they encode (T5-XXL is 9 GB)


@dataclass(kw_only=True)
class DeviceOption:
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA if there is one; each process takes the GPU of its LOCAL_RANK


@dataclass(kw_only=True)
class CompileOption:
    # torch.compile the denoiser (inductor): faster calls once compiled, after a compile of minutes in every process
    # (and once more for shapes of any size when the batch size first changes); see docs/performance.md
    compile: bool = False


@dataclass(kw_only=True)
class RewardSourceOption:
    reward_source: list[str] = field(default_factory=list)  # NAME=PATH: load reward NAME from a local folder/file


@dataclass(kw_only=True)
class InferenceOptions(SamplerOptions, TextEncoderOptions, DeviceOption, CompileOption):
    model: str | None = None  # base pipeline (hub id or folder); default: the one the checkpoint records, else SD 1.5
    # alpha of LoRA state dicts saved with torch.save (RTDMD's .pt), which do not record it (scale = alpha / rank)
    lora_alpha: float = models.RTDMD_LORA_ALPHA
    raw_weights: bool = False  # with a checkpoint holding EMA weights (ema/), use the raw ones instead
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
        validate_sigmas(cfg)
    if isinstance(cfg, TextEncoderOptions):
        utils.require_at_least_one(max_sequence_length=cfg.max_sequence_length)
    if isinstance(cfg, InferenceOptions):
        utils.require_at_least_one(batch_size=cfg.batch_size)
    if isinstance(cfg, RewardSourceOption):
        rewards.parse_reward_sources(cfg.reward_source)


def validate_sigmas(cfg: SamplerOptions) -> None:
    if not cfg.sigmas:
        return
    if cfg.scheduler != "cps":
        raise UsageError("--sigmas sets the schedule of --sampler cps; add it, or leave --sigmas out")
    if not all(1 >= a > b for a, b in zip(cfg.sigmas, (*cfg.sigmas[1:], 0.0))):
        raise UsageError(f"--sigmas must fall strictly within (0, 1], noisiest first, got {' '.join(map(str, cfg.sigmas))}")
    if cfg.inference_steps not in (None, len(cfg.sigmas)):
        raise UsageError(f"--inference-steps {cfg.inference_steps} disagrees with the {len(cfg.sigmas)} --sigmas; "
                         "leave it out")


def with_family_defaults(cfg, family: str):
    """`cfg` with every unset (None) field that has a default for `family` filled in (see
    models.FAMILY_DEFAULTS), and the options that do not fit the family refused."""
    defaults = {**models.FAMILY_DEFAULTS[family], **({"inference_steps": len(cfg.sigmas)} if cfg.sigmas else {})}
    cfg = replace(cfg, **{f.name: defaults[f.name] for f in fields(cfg)
                          if f.name in defaults and getattr(cfg, f.name) is None})
    flow = family in models.FLOW_FAMILIES
    if cfg.scheduler == "cps" and not flow:
        raise UsageError(f"--sampler cps is a step for flow-matching models (SD3); this model is {family}")
    if cfg.scheduler == "ddim" and flow:
        raise UsageError("--scheduler ddim is for SD and SDXL; this flow-matching model samples with its "
                         "pipeline scheduler (the default) or cps")
    if isinstance(cfg, TextEncoderOptions) and cfg.no_t5 and family != "sd3":
        raise UsageError(f"--no-t5: this model ({family}) has no T5 encoder")
    return cfg


def text_encoding(cfg: TextEncoderOptions) -> models.TextEncoding:
    return models.TextEncoding(cfg.max_sequence_length, t5=not cfg.no_t5, offload=cfg.offload_text_encoders)


# ---------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class SamplerSettings:
    resolution: int
    num_steps: int
    guidance_scale: float
    eta: float = 0.0
    sigmas: tuple[float, ...] = ()  # a custom schedule (cps); empty: the scheduler's own

    @classmethod
    def of(cls, cfg) -> "SamplerSettings":
        """From an entry script's config (its family defaults and resolution already resolved)."""
        return cls(cfg.resolution, cfg.inference_steps, cfg.guidance_scale, cfg.eta, cfg.sigmas)


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
    device = model.denoiser.device
    conditioning = models.encode_prompts(model, prompts, sampling.uses_guidance(settings.guidance_scale),
                                         settings.resolution)
    gens = utils.generators(seeds, device)
    schedule = models.schedule_kwargs(model, settings.resolution, settings.sigmas)
    # Euler's init_noise_sigma depends on the timesteps, which the pipelines set before drawing x_T.
    model.scheduler.set_timesteps(settings.num_steps, device=device, **schedule)
    shape = model.latent_shape(len(prompts), settings.resolution)
    x_T = sampling.initial_latents(shape, gens, model.scheduler, device, latent_dtype)
    base = models.base_denoiser(model, conditioning)
    tuned = base if base_only else models.tuned_denoiser(model, conditioning)
    trajectory = sampling.sample(
        tuned, model.scheduler, x_T, num_steps=settings.num_steps, guidance_scale=settings.guidance_scale,
        eta=settings.eta, generator=gens, truncation_steps=truncation_steps,
        base=base if (with_kl or weighing) else None,
        weighing=sampling.parse_weighing(weighing) if weighing else None,
        lv_samples=lv_samples, checkpoint_denoiser=checkpoint_denoiser, schedule=schedule,
    )
    return models.decode(model, trajectory.latents), trajectory.kl


Job = tuple[int, int]  # (prompt index in its set, repeat)


def render_jobs(model: models.DiffusionModel, texts: Mapping[int, str], jobs: list[Job], settings: SamplerSettings,
                *, seed: int, weighing: str) -> torch.Tensor:
    """Images of (prompt p, repeat r) jobs as generate, anneal and metrics all draw them: the noise of
    (p, r) comes from (seed, p, r) alone, so any batching or number of GPUs gives the same images, and
    latents are in the weights' dtype."""
    seeds = [utils.derive_seed(seed, p, r) for p, r in jobs]
    images, _ = generate(model, [texts[p] for p, _ in jobs], seeds, settings, latent_dtype=model.denoiser.dtype,
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


def load_for_inference(cfg: InferenceOptions, checkpoints: tuple[str, ...], device: torch.device):
    """The base pipeline (--model, else the one the first checkpoint that records one names, or SD
    1.5 without a checkpoint) with the checkpoints' tuned weights (their EMA where they hold one,
    unless --raw-weights) on top, applied in order. Returns
    the model and `cfg` resolved for it: the model's name, its family's defaults, the resolution."""
    recorded = next((name for name in map(models.model_name, checkpoints) if name), None)
    name = cfg.model or recorded or (None if checkpoints else models.DEFAULT_MODEL)
    if name is None:
        raise UsageError(f"checkpoint {checkpoints[0]!r} does not record its base model; name it with --model")
    cfg = with_family_defaults(cfg, models.detect_family(name))
    model = models.load_model(name, device, inference_dtype(cfg.dtype, device), cfg.scheduler, text_encoding(cfg))
    models.load_checkpoints_for_inference(model, checkpoints, cfg.lora_alpha, cfg.raw_weights)
    if cfg.compile:
        models.compile_denoisers(model)
    if not cfg.raw_weights and any(map(models.ema_folder, checkpoints)):
        utils.print0("loaded the EMA weights (ema/) of the checkpoints that hold them; --raw-weights loads "
                     "the raw ones")
    return model, replace(cfg, model=name, resolution=checked_resolution(model, cfg.resolution))


def checked_resolution(model: models.DiffusionModel, resolution: int | None) -> int:
    resolution = resolution or model.default_resolution()
    if resolution % model.resolution_multiple():
        raise UsageError(f"--resolution {resolution} must be a multiple of {model.resolution_multiple()} for this model")
    return resolution

"""Prompts and seeds to images: the glue between models.py and families.py (family-specific) and
sampling.py (family-free), shared by training rollouts, annealed sampling, grids and metrics."""

import contextlib
from dataclasses import dataclass, field, fields, replace
from typing import Annotated, Iterator, Literal, Mapping

import torch
import tyro
from tqdm import tqdm

import families
import models
import rewards
import sampling
import utils
from utils import UsageError

# ---------------------------------------------------------------------------------------------
# Options several entry scripts share, each defined once: a script's config inherits the groups it takes.


@dataclass(kw_only=True)
class SamplerOptions:
    # sampler steps N; default 50 (SD, SDXL, FLUX.2 [klein] base), 40 (SD3, as FDFO), 28 (FLUX.1-dev), 4 (FLUX.1
    # without its guidance embedding: schnell; klein distilled), len(--sigmas)
    inference_steps: int | None = None
    # classifier-free guidance scale (1 turns guidance off); default 7.5 (SD, SDXL), 4.5 (SD3; FDFO's no-CFG checkpoints
    # need 1), 4 (FLUX.2 [klein] base; its distilled models take none); FLUX.1: the embedded guidance of
    # guidance-distilled models (default 3.5; 0 for schnell, which has none)
    guidance_scale: float | None = None
    # FLUX.1: true classifier-free guidance against the empty prompt, a second network call per step (default 1: off)
    true_cfg_scale: float | None = None
    # eta of DDIM (0 deterministic, 1 DDPM-like noise) and of cps (0 is the Euler step; RTDMD samples with 0.9); others ignore it
    eta: float = 0.0
    # ddim: DDIM built from the pipeline's config (SD, SDXL default); pipeline: its own (SD3, FLUX.2 default: flow-match
    # Euler with its shift); cps: RTDMD's coefficients-preserving step on the flow-match schedule (with --eta, --sigmas)
    scheduler: Annotated[Literal["ddim", "pipeline", "cps"] | None, tyro.conf.arg(aliases=("--sampler",))] = None
    # cps only: the sigma schedule as given, already shifted, e.g. RTDMD's SD3.5 1.0 0.9 0.75 0.5; under dynamic
    # shifting (FLUX.2) shifted by the pipeline's mu, as the pipeline's sigmas, e.g. RTDMD's FLUX.2 1.0 0.75 0.5 0.25
    sigmas: tuple[float, ...] = ()
    # image side in pixels; default from the model config (512 for SD 1.5); SD3 and FLUX.2 [klein] train at 512
    resolution: int | None = None


@dataclass(kw_only=True)
class TextEncoderOptions:
    # text tokens of a prompt; default the pipeline's: 256 T5 tokens (SD3; FDFO trains with 128), 512 T5 tokens
    # (FLUX.1-dev; 256 for schnell), 512 Qwen3 tokens (FLUX.2)
    max_sequence_length: int | None = None
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


SD35_MEDIUM = "stabilityai/stable-diffusion-3.5-medium"

# Every setting of a published system's own evaluation that shapes its images, from its code
# (tests/test_protocols.py checks each against the line it comes from). Neither system's prompt selection
# nor noise seeds are ours to copy: numbers compare within their confidence intervals.
PROTOCOLS = {
    # FDFO (NVlabs/finite-difference-flow-optimization): eval/calculate_metrics.py samples with the stock
    # StableDiffusion3Pipeline of eval/models.py (bf16, its own flow-match Euler scheduler, its default of
    # 256 T5 tokens; FDFO trains with 128) at 512 px, 40 steps, guidance 1 (its -cfg-2.0 / -cfg-4.5
    # checkpoints: add that --guidance-scale).
    "fdfo": dict(model=SD35_MEDIUM, scheduler="pipeline", inference_steps=40, guidance_scale=1.0, resolution=512,
                 max_sequence_length=256, dtype="bfloat16"),
    # RTDMD (Harahan/RTDMD): configs/inference/sd35m.yaml run by rtdmd/inference.py: bf16, 1024 px, its CPS
    # step with eta 0.9 on timesteps 1000 750 500 250 at shift 3, no CFG, T5 at 128 tokens, LoRA alpha 64.
    "rtdmd": dict(model=SD35_MEDIUM, scheduler="cps", sigmas=(1.0, 0.9, 0.75, 0.5), eta=0.9, guidance_scale=1.0,
                  resolution=1024, max_sequence_length=128, lora_alpha=models.RTDMD_LORA_ALPHA, dtype="bfloat16"),
    # RTDMD's FLUX.2-klein-4B release: configs/inference/flux2_4b.yaml run by rtdmd/inference.py: the distilled
    # klein 4B in bf16 at 1024 px, the CPS step with eta 0.9 on timesteps 1000 750 500 250 / 1000, shifted by the
    # pipeline's mu (rtdmd/models/flux2_klein.py compute_sigmas_flux2_klein; the cps step does it with dynamic
    # shifting), no CFG, 512 Qwen3 tokens (that file's encode_prompts_flux2_klein), LoRA alpha 64.
    "rtdmd-flux2": dict(model="black-forest-labs/FLUX.2-klein-4B", scheduler="cps", sigmas=(1.0, 0.75, 0.5, 0.25),
                        eta=0.9, guidance_scale=1.0, resolution=1024, max_sequence_length=512,
                        lora_alpha=models.RTDMD_LORA_ALPHA, dtype="bfloat16"),
}


@dataclass(kw_only=True)
class ProtocolOption:
    # a published system's evaluation settings in one flag (generation.PROTOCOLS, printed at start): fdfo (SD3.5 Medium,
    # 40 steps, guidance 1, 512 px), rtdmd (its 4-step cps sampler at 1024 px) or rtdmd-flux2 (the same on FLUX.2-klein-4B);
    # a flag given beside it wins, said in a line
    protocol: Literal["none", *PROTOCOLS] = "none"


@dataclass(kw_only=True)
class InferenceOptions(SamplerOptions, TextEncoderOptions, DeviceOption, ProtocolOption, CompileOption):
    model: str | None = None  # base pipeline (hub id or folder); default: the one the checkpoint records, else SD 1.5
    # alpha of LoRA state dicts saved with torch.save (RTDMD's .pt), which do not record it (scale = alpha / rank)
    lora_alpha: float = models.RTDMD_LORA_ALPHA
    raw_weights: bool = False  # with a checkpoint holding EMA weights (ema/), use the raw ones instead
    seed: int = 0  # the noise of image (prompt p, repeat r) comes from (seed, p, r) alone, on any number of GPUs
    batch_size: int = 4  # images per denoiser call per process
    # diffusion weights and latents; auto = bfloat16 on GPU, float32 on CPU (scores are always computed in float32)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


def validate_shared_options(cfg) -> None:
    """The checks of the shared option groups a config has, and no float flag NaN or infinite; a setting
    of --protocol that a flag beside it contradicts is named with the error."""
    if getattr(cfg, "protocol", "none") != "none" and getattr(cfg, "preset", "none") != "none":
        raise UsageError(f"--protocol {cfg.protocol} and --preset {cfg.preset} both set the sampler; give one")
    with protocol_named_in_errors(cfg):
        _validate_shared_options(cfg)


def _validate_shared_options(cfg) -> None:
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


def _as_typed(setting) -> str:
    """A setting as it is typed after its flag."""
    return " ".join(map(str, setting)) if isinstance(setting, tuple) else str(setting)


def protocol_settings(name: str) -> str:
    """A protocol's settings as the flags that would give them."""
    return " ".join(f"{utils.flag(key)} {_as_typed(setting)}" for key, setting in PROTOCOLS[name].items())


@contextlib.contextmanager
def protocol_named_in_errors(cfg):
    """An error about flags that --protocol set says so: the user may have given only the flag that conflicts."""
    try:
        yield
    except UsageError as error:
        if getattr(cfg, "protocol", "none") == "none":
            raise
        raise UsageError(f"{error} (--protocol {cfg.protocol} sets {protocol_settings(cfg.protocol)})") from None


def print_protocol(cfg) -> None:
    """The protocol's settings, and each flag given beside it that overrides one of them."""
    if cfg.protocol == "none":
        return
    utils.print0(f"--protocol {cfg.protocol}: {protocol_settings(cfg.protocol)}")
    for key, setting in PROTOCOLS[cfg.protocol].items():
        if getattr(cfg, key) != setting:
            utils.print0(f"note: {utils.flag(key)} {_as_typed(getattr(cfg, key))} given, over --protocol "
                         f"{cfg.protocol}'s {_as_typed(setting)}")


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


def with_family_defaults(cfg, family: families.Family):
    """`cfg` with every unset (None) field that has a default for `family` filled in (its `defaults`),
    and the options that do not fit the family refused."""
    defaults = {**family.defaults, **({"inference_steps": len(cfg.sigmas)} if cfg.sigmas else {})}
    cfg = replace(cfg, **{f.name: defaults[f.name] for f in fields(cfg)
                          if f.name in defaults and getattr(cfg, f.name) is None})
    family.validate(cfg)
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
    true_cfg_scale: float = 1.0  # FLUX.1's true CFG beside its embedded guidance; 1: off

    @classmethod
    def of(cls, cfg, resolution: int | None = None) -> "SamplerSettings":
        """From an entry script's config (its family defaults and resolution already resolved)."""
        true_cfg_scale = 1.0 if cfg.true_cfg_scale is None else cfg.true_cfg_scale
        return cls(resolution or cfg.resolution, cfg.inference_steps, cfg.guidance_scale, cfg.eta, cfg.sigmas,
                   true_cfg_scale)


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
    guidance = model.family.guidance(model, settings)
    conditioning = models.encode_prompts(model, prompts, sampling.uses_guidance(guidance.cfg_scale),
                                         settings.resolution, guidance.embedded)
    gens = utils.generators(seeds, device)
    schedule = models.schedule_kwargs(model, settings.resolution, settings.sigmas, settings.num_steps)
    # Euler's init_noise_sigma depends on the timesteps, which the pipelines set before drawing x_T.
    model.scheduler.set_timesteps(settings.num_steps, device=device, **schedule)
    shape = model.latent_shape(len(prompts), settings.resolution)
    x_T = sampling.initial_latents(shape, gens, model.scheduler, device, latent_dtype)
    base = under_autocast(models.base_denoiser(model, conditioning), model.autocast)
    tuned = base if base_only else under_autocast(models.tuned_denoiser(model, conditioning), model.autocast)
    trajectory = sampling.sample(
        tuned, model.scheduler, x_T, num_steps=settings.num_steps, guidance_scale=guidance.cfg_scale,
        eta=settings.eta, generator=gens, truncation_steps=truncation_steps,
        base=base if (with_kl or weighing) else None,
        weighing=sampling.parse_weighing(weighing) if weighing else None,
        lv_samples=lv_samples, checkpoint_denoiser=checkpoint_denoiser, schedule=schedule,
    )
    return models.decode(model, trajectory.latents), trajectory.kl


def under_autocast(denoise, dtype: torch.dtype | None):
    """The denoiser's calls, and only they, under autocast to `dtype` (None: none): prompt encoding, the
    scheduler's arithmetic, the VAE and the rewards stay outside, in the dtypes they are made for."""
    if dtype is None:
        return denoise

    def denoise_under_autocast(model_input, t):
        with torch.autocast(model_input.device.type, dtype=dtype):
            return denoise(model_input, t)

    return denoise_under_autocast


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
    protocol_model = PROTOCOLS.get(cfg.protocol, {}).get("model")
    if protocol_model and cfg.model == protocol_model and recorded not in (None, protocol_model):
        raise UsageError(f"checkpoint {checkpoints[0]!r} was trained from {recorded!r}, not --protocol {cfg.protocol}'s "
                         f"{protocol_model!r}; give --model {recorded} to sample it with the protocol's other settings")
    name = cfg.model or recorded or (None if checkpoints else models.DEFAULT_MODEL)
    if name is None:
        raise UsageError(f"checkpoint {checkpoints[0]!r} does not record its base model; name it with --model")
    with protocol_named_in_errors(cfg):
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

"""Loading diffusers pipelines, the per-family denoiser, prompt encoding, VAE decoding, and the
trainable part (LoRA through peft, or a full fine-tune with a frozen copy as the base)."""

import contextlib
import copy
import json
import os
import warnings
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft

import utils
from utils import UsageError

# diffusers still passes this argument to huggingface_hub, which warns on every hub lookup.
warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_FILE = "pytorch_lora_weights.safetensors"
FULL_UNET_DIR = "unet"
SHARDED_DIR = "sharded"  # a --fsdp checkpoint's torch.distributed.checkpoint of the UNet and optimizer
FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
# Keyword arguments of from_pretrained that only some pipeline classes accept (others would warn).
LOAD_KWARGS = {"sd": {"safety_checker": None, "requires_safety_checker": False}, "sdxl": {}}


@dataclass
class DiffusionModel:
    pipe: DiffusionPipeline  # tokenizer, text encoder, VAE, scheduler and the (tuned) UNet
    family: str
    frozen_base: torch.nn.Module | None = None  # full fine-tuning only; with LoRA the base is adapters-off
    # no-grad calls of a LoRA model run on merged weights, at the speed of the plain network
    merged_sampling: bool = True
    _lora: "LoraLayers | None" = None

    @property
    def lora(self) -> "LoraLayers":
        """The UNet's LoRA layers, listed on first use (after the adapters are attached or loaded)."""
        if self._lora is None:
            self._lora = LoraLayers(self.unet)
        return self._lora

    def lora_changed(self) -> None:
        """The LoRA weights moved (an optimizer step, a restore): merged weights are made again when next needed."""
        if self._lora is not None:
            self._lora.stale()

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.unet, "peft_config", None))

    def default_resolution(self) -> int:
        return self.unet.config.sample_size * self.pipe.vae_scale_factor

    def latent_shape(self, batch: int, resolution: int) -> tuple[int, ...]:
        side = resolution // self.pipe.vae_scale_factor
        return (batch, self.unet.config.in_channels, side, side)


def cache_only(model: str) -> bool:
    """A hub id, with the hub out of reach: only the local cache can serve it."""
    return not os.path.isdir(model) and not utils.hub_reachable()


def detect_family(model: str) -> str:
    """The family from the pipeline folder's model_index.json; a hub id is looked up the same way."""
    try:
        class_name = DiffusionPipeline.load_config(model, local_files_only=cache_only(model))["_class_name"]
    except Exception as error:  # hub, network and file errors alike end in one line
        if cache_only(model):
            raise UsageError(f"cannot load model {model!r}: the Hugging Face hub is unreachable from here and "
                             "the model is not in the local cache; give a diffusers pipeline folder with --model PATH"
                             ) from None
        raise UsageError(
            f"cannot load model {model!r} ({_first_line(error)}); give a diffusers pipeline folder "
            "with --model PATH, or a hub id that is cached or reachable"
        ) from None
    if class_name not in FAMILIES:
        raise UsageError(f"model {model!r} is a {class_name}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[class_name]


def load_model(model: str, device: torch.device, dtype: torch.dtype = torch.float32, scheduler: str = "ddim") -> DiffusionModel:
    """Load a pipeline with every part frozen; `scheduler="ddim"` swaps in DDIM built from its config."""
    family = detect_family(model)
    quiet_loading()
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, local_files_only=cache_only(model),
                                                 **LOAD_KWARGS[family])
    except Exception as error:
        raise UsageError(f"cannot load model {model!r}: {_first_line(error)}") from None
    if scheduler == "ddim":
        pipe.scheduler = ddim_from(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False).eval()
    if _upcasts_vae(family, pipe.vae) and pipe.vae.dtype == torch.float16:
        pipe.vae.float()  # for good: switching dtypes around a decode that keeps its graph would break backward
    pipe.to(device)
    return DiffusionModel(pipe=pipe, family=family)


def ddim_from(config) -> DDIMScheduler:
    """DDIM with the pipeline scheduler's noise schedule. A config that does not say whether to clip
    x_0 (Euler's, for one) must not get DDIM's default of clipping it to [-1, 1]: that default is for
    pixel-space models, and latents range wider."""
    overrides = {} if "clip_sample" in config else {"clip_sample": False}
    return DDIMScheduler.from_config(config, **overrides)


@contextlib.contextmanager
def diffusers_quiet():
    """diffusers' logger silenced for a call whose warnings we report ourselves or know to be empty."""
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


def quiet_loading() -> None:
    """Loading and saving bars of every sub-model would bury the status lines."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


# ---------------------------------------------------------------------------------------------
# Trainable part


def attach_lora(model: DiffusionModel, rank: int, alpha: float) -> None:
    """LoRA on the UNet attention projections; the adapter starts as the identity (B = 0)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    model.unet.add_adapter(config)
    for param in model.unet.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # trainable weights stay fp32 under bf16 autocast


def enable_full_finetune(model: DiffusionModel, frozen_dtype: torch.dtype = torch.float32) -> None:
    """Train every UNet weight, in fp32; a frozen copy made now is the base for the KL and annealing.
    The frozen networks (that copy, the text encoders, the VAE) go to `frozen_dtype`, the training
    dtype: in fp32 they would double their memory for nothing under bf16 autocast."""
    model.frozen_base = copy.deepcopy(model.unet).requires_grad_(False).eval()
    frozen = [model.frozen_base] + [part for name, part in model.pipe.components.items()
                                    if isinstance(part, torch.nn.Module) and part is not model.unet
                                    # SDXL's VAE overflows in fp16 (see decode)
                                    and not (name == "vae" and frozen_dtype == torch.float16
                                             and _upcasts_vae(model.family, part))]
    with diffusers_quiet():  # it warns of fp32-only modules at every cast, even with none listed
        for part in frozen:
            part.to(frozen_dtype)
    model.unet.float().requires_grad_(True).train()


def trainable_parameters(model: DiffusionModel) -> list[torch.nn.Parameter]:
    return [p for p in model.unet.parameters() if p.requires_grad]


class LoraLayers:
    """A network's LoRA layers, found once and switched directly. peft's `disable_adapters()` walks every
    module of the network (~49 ms a toggle on an SDXL-sized UNet) and flips requires_grad on every
    adapter, paid at each KL step and twice per mixed annealing step; flipping the listed layers costs
    what a plain call costs."""

    def __init__(self, network: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.layers = [module for module in network.modules() if isinstance(module, BaseTunerLayer)]
        self._merged: list[torch.nn.Parameter] | None = None

    def stale(self) -> None:
        self._merged = None

    @contextlib.contextmanager
    def disabled(self):
        """The network without its adapters: the pretrained model."""
        states = [layer._disable_adapters for layer in self.layers]
        for layer in self.layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer, state in zip(self.layers, states):
                layer._disable_adapters = state

    @contextlib.contextmanager
    def merged(self):
        """The network with W + scale * B @ A in place of each W, exactly the LoRA model, at the cost of a
        plain call. The merged weights live in buffers of their own, made once per change of the LoRA
        weights: merging into W and back again would drift bf16 weights."""
        if self._merged is None:
            with torch.no_grad():
                self._merged = [torch.nn.Parameter(_merged_weight(layer), requires_grad=False) for layer in self.layers]
        originals = [layer.base_layer._parameters["weight"] for layer in self.layers]
        with self.disabled():
            for layer, weight in zip(self.layers, self._merged):
                layer.base_layer._parameters["weight"] = weight
            try:
                yield
            finally:
                for layer, weight in zip(self.layers, originals):
                    layer.base_layer._parameters["weight"] = weight


def _merged_weight(layer) -> torch.Tensor:
    weight = layer.base_layer.weight
    merged = weight.float()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            merged = merged + layer.get_delta_weight(adapter).float()
    return merged.to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# Conditioning and denoisers


@torch.no_grad()
def encode_prompts(model: DiffusionModel, prompts: list[str], guided: bool, resolution: int) -> dict:
    """The UNet keyword arguments for a batch of images `resolution` pixels square: `[uncond; cond]`
    when guided, the empty prompt as negative, exactly as the pipeline's own encode_prompt builds them."""
    if model.family == "sdxl":
        return _encode_prompts_sdxl(model.pipe, prompts, guided, resolution)
    positive, negative = model.pipe.encode_prompt(prompts, model.unet.device, 1, guided, negative_prompt=None)
    hidden = torch.cat([negative, positive]) if guided else positive
    return {"encoder_hidden_states": hidden}


def _encode_prompts_sdxl(pipe, prompts: list[str], guided: bool, resolution: int) -> dict:
    """Both encoders' hidden states, and the added condition: the second encoder's pooled embedding
    and the time ids of an uncropped image generated at its own size, as the SDXL pipeline's
    defaults make them (its encode_prompt zeroes the negative when force_zeros_for_empty_prompt)."""
    positive, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, device=pipe.unet.device, num_images_per_prompt=1, do_classifier_free_guidance=guided
    )
    size = (resolution, resolution)
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=positive.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    time_ids = time_ids.to(pipe.unet.device).repeat(len(prompts) * (2 if guided else 1), 1)
    if guided:
        positive, pooled = torch.cat([negative, positive]), torch.cat([negative_pooled, pooled])
    return {"encoder_hidden_states": positive, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def make_denoiser(unet, conditioning: dict):
    def denoise(model_input, t):
        return unet(model_input, t, **conditioning, return_dict=False)[0]

    return denoise


def tuned_denoiser(model: DiffusionModel, conditioning: dict):
    """The tuned model. Its calls without a graph (the first N - K steps, all of inference) run on the
    merged LoRA weights; calls with a graph keep the LoRA layers, whose weights are being trained."""
    denoise = make_denoiser(model.unet, conditioning)
    if not (model.has_lora and model.merged_sampling):
        return denoise

    def denoise_merged_without_graph(model_input, t):
        if torch.is_grad_enabled():
            return denoise(model_input, t)
        with model.lora.merged():
            return denoise(model_input, t)

    return denoise_merged_without_graph


def base_denoiser(model: DiffusionModel, conditioning: dict):
    """The pretrained model: the frozen copy, or the same network with its adapters switched off."""
    if model.frozen_base is not None:
        return make_denoiser(model.frozen_base, conditioning)
    if not model.has_lora:
        return make_denoiser(model.unet, conditioning)
    denoise = make_denoiser(model.unet, conditioning)

    def denoise_without_adapters(model_input, t):
        with model.lora.disabled():
            return denoise(model_input, t)

    return denoise_without_adapters


def decode(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents to float images [B,3,H,W] in [0,1], differentiable."""
    vae = model.pipe.vae
    z = latents / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        z = z + vae.config.shift_factor
    with _fp16_autocast_suspended(vae) if _upcasts_vae(model.family, vae) else contextlib.nullcontext():
        images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def _upcasts_vae(family: str, vae) -> bool:
    """SDXL's VAE overflows in fp16, which its config flags with force_upcast, and the SDXL pipeline
    then decodes in fp32. bf16 has fp32's range, so only fp16 is avoided."""
    return family == "sdxl" and vae.config.force_upcast


@contextlib.contextmanager
def _fp16_autocast_suspended(vae):
    """An fp32 VAE under fp16 autocast would run in fp16 after all."""
    device_type = vae.device.type
    fp16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
    with torch.autocast(device_type, enabled=False) if fp16 else contextlib.nullcontext():
        yield


# ---------------------------------------------------------------------------------------------
# Saving and loading the tuned weights


def save_tuned(model: DiffusionModel, folder: str) -> None:
    """LoRA as diffusers' `pytorch_lora_weights.safetensors` (stock `load_lora_weights` reads
    it), or the full UNet as a diffusers model folder."""
    if model.has_lora:
        from diffusers.training_utils import _collate_lora_metadata
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model.unet))
        type(model.pipe).save_lora_weights(folder, unet_lora_layers=layers, **_collate_lora_metadata({"unet": model.unet}))
    else:
        model.unet.save_pretrained(os.path.join(folder, FULL_UNET_DIR))


def load_tuned_into_training(model: DiffusionModel, folder: str) -> None:
    """Restore a checkpoint's weights into the already built trainable model (resume)."""
    if model.has_lora:
        from peft import set_peft_model_state_dict

        state, _ = type(model.pipe).lora_state_dict(folder)
        unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(model.unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise UsageError(f"checkpoint {folder!r} does not fit this model's LoRA")
        model.lora_changed()
    else:
        tuned = UNet2DConditionModel.from_pretrained(os.path.join(folder, FULL_UNET_DIR))
        model.unet.load_state_dict(tuned.state_dict())


def load_checkpoint_for_inference(model: DiffusionModel, checkpoint: str) -> None:
    """Make `model` the tuned model of `checkpoint`, keeping the pretrained one as its base.

    Weights made for another base model are refused in one line: diffusers would only warn about
    LoRA layers the model lacks, and a full UNet of another shape would load on its own.
    """
    from peft.utils import get_peft_model_state_dict

    trained_from = model_name(checkpoint)
    lora_file = os.path.join(checkpoint, LORA_FILE)
    full_dir = os.path.join(checkpoint, FULL_UNET_DIR)
    if not os.path.isfile(lora_file) and not os.path.isdir(full_dir):
        sharded = (": it is a sharded --fsdp checkpoint; the final one, and one every --export-every steps, "
                   "also hold the consolidated UNet") if os.path.isdir(os.path.join(checkpoint, SHARDED_DIR)) else ""
        raise UsageError(f"checkpoint {checkpoint!r} has neither {LORA_FILE} nor a {FULL_UNET_DIR}/ folder{sharded}")
    problem = None
    try:
        # diffusers' multi-line report becomes our one line
        with diffusers_quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if os.path.isfile(lora_file):
                state, _ = type(model.pipe).lora_state_dict(checkpoint)
                wanted = convert_unet_state_dict_to_peft(
                    {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
                )
                model.pipe.load_lora_weights(checkpoint, adapter_name="tuned")
                unmatched = set(wanted) - set(get_peft_model_state_dict(model.unet, adapter_name="tuned"))
                if unmatched:
                    example = min(unmatched)
                    problem = f"{len(unmatched)} of its {len(wanted)} LoRA weights have no layer here, e.g. {example}"
            else:
                tuned = UNet2DConditionModel.from_pretrained(full_dir, dtype=model.unet.dtype)
                ours, theirs = (json.loads(json.dumps(dict(unet.config), default=str)) for unet in (model.unet, tuned))
                differing = sorted(k for k in ours.keys() | theirs.keys()
                                   if not k.startswith("_") and ours.get(k) != theirs.get(k))
                if differing:
                    problem = f"its UNet differs in {', '.join(differing)}"
                else:
                    model.frozen_base = model.pipe.unet
                    model.pipe.unet = tuned.to(model.unet.device).requires_grad_(False).eval()
    except Exception as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        problem = next((line for line in lines if line.startswith("size mismatch")), lines[0])
    if problem:
        origin = f"trained from {trained_from!r}" if trained_from else "base model not recorded"
        raise UsageError(f"checkpoint {checkpoint!r} ({origin}) does not fit model {model.pipe.name_or_path!r}: {problem}")


def model_name(checkpoint: str) -> str | None:
    """The --model a checkpoint was trained from, as its config.json records it; None if it does not."""
    if not os.path.isdir(checkpoint):
        raise UsageError(f"checkpoint {checkpoint!r} is not a folder; give one such as RUN_DIR/checkpoints/step-0001000")
    try:
        with open(os.path.join(checkpoint, "config.json")) as f:
            return json.load(f)["model"]
    except (OSError, KeyError, TypeError, ValueError):
        return None

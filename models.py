"""Loading diffusers pipelines (each family's particulars are in families.py), the denoisers, the
trainable part (LoRA through peft, or a full fine-tune with a frozen copy as the base), and the
tuned weights of other systems (FDFO's PEFT adapters, RTDMD's LoRA state dicts) as inputs."""

import contextlib
import copy
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace

import torch
from diffusers import DDIMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from diffusers.utils.torch_utils import randn_tensor

import families
import utils
from utils import UsageError

# diffusers still passes this argument to huggingface_hub, which warns on every hub lookup.
warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LORA_FILE = "pytorch_lora_weights.safetensors"
FULL_UNET_DIR = families.SD.denoiser_name
SHARDED_DIR = "sharded"  # a --fsdp checkpoint's torch.distributed.checkpoint of the denoiser and optimizer
EMA_DIR = "ema"  # a --ema-decay checkpoint's moving average of the tuned weights, in the formats of the raw ones
# LoRA state dicts saved with torch.save (RTDMD's) do not record alpha; RTDMD trains and loads with 64.
RTDMD_LORA_ALPHA = 64.0
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class TextEncoding:
    """How prompts are encoded where the family has a T5 encoder (SD3) and where encoders are large."""
    # text tokens of a prompt (T5's, Qwen3's); None: the family's default, its pipeline's (256 SD3, 512 FLUX.2)
    max_sequence_length: int | None = None
    t5: bool = True  # False: no T5 at all (zeros in its place, as the pipeline does without text_encoder_3)
    offload: bool = False  # keep the text encoders on the CPU except while they encode


@dataclass
class DiffusionModel:
    pipe: DiffusionPipeline  # tokenizers, text encoders, VAE, scheduler and the (tuned) denoiser
    family: families.Family
    frozen_base: torch.nn.Module | None = None  # full fine-tuning only; with LoRA the base is adapters-off
    text: TextEncoding = field(default_factory=TextEncoding)
    # no-grad calls of a LoRA model run on merged weights, at the speed of the plain network
    merged_sampling: bool = True
    # training's mixed precision: the denoiser's calls alone run under autocast to it (generation.generate), while
    # the text encoders, the VAE and the rewards keep the dtypes they are made for (T5's fp32 `wo`, a bf16 judge)
    autocast: torch.dtype | None = None
    _lora: "LoraLayers | None" = None

    @property
    def denoiser_name(self) -> str:
        return self.family.denoiser_name

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network: the UNet of SD and SDXL, the MMDiT transformer of SD3 (the family's denoiser_name)."""
        return getattr(self.pipe, self.denoiser_name)

    @property
    def lora(self) -> "LoraLayers":
        """The denoiser's LoRA layers, listed on first use (after the adapters are attached or loaded)."""
        if self._lora is None:
            self._lora = LoraLayers(self.denoiser)
        return self._lora

    def lora_changed(self) -> None:
        """The LoRA weights moved (an optimizer step, a restore): merged weights are made again when next needed."""
        if self._lora is not None:
            self._lora.stale()

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser by the name the SD and SDXL code gives it."""
        return self.denoiser

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.denoiser, "peft_config", None))

    def default_resolution(self) -> int:
        return self.family.default_resolution(self)

    def resolution_multiple(self) -> int:
        return self.family.resolution_multiple(self)

    def latent_shape(self, batch: int, resolution: int) -> tuple[int, ...]:
        return self.family.latent_shape(self, batch, resolution)


def cache_only(model: str) -> bool:
    """A hub id, with the hub out of reach: only the local cache can serve it."""
    return not os.path.isdir(model) and not utils.hub_reachable()


def detect_family(model: str) -> families.Family:
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
    family = families.of_pipeline(class_name)
    if family is None:
        raise UsageError(f"model {model!r} is a {class_name}; supported: {', '.join(families.pipeline_names())}")
    return family.for_checkpoint(model)


def load_model(model: str, device: torch.device, dtype: torch.dtype = torch.float32, scheduler: str | None = None,
               text: TextEncoding = TextEncoding(), denoiser_dtype: torch.dtype | None = None,
               denoiser_device: torch.device | None = None) -> DiffusionModel:
    """Load a pipeline with every part frozen. `scheduler`: "ddim" swaps in DDIM built from its config,
    "cps" the CPS step on its flow-match schedule, "pipeline" keeps its own; default the family's.
    `denoiser_dtype`: the denoiser's own dtype where it differs from the rest's (a full fine-tune trains it
    in fp32 while what stays frozen loads in the training dtype, never in fp32 first). `denoiser_device`:
    where the denoiser stays where it differs from `device` (see prepared)."""
    family = detect_family(model)
    scheduler = scheduler or family.defaults["scheduler"]
    dtypes = {"default": dtype, family.denoiser_name: denoiser_dtype} if denoiser_dtype else dtype
    quiet_loading()
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtypes, local_files_only=cache_only(model),
                                                 **{**_components_left_out(model, family, text), **family.load_kwargs})
    except Exception as error:
        raise UsageError(f"cannot load model {model!r}: {_first_line(error)}") from None
    return prepared(pipe, family, device, scheduler, text, denoiser_device)


def prepared(pipe: DiffusionPipeline, family: families.Family, device: torch.device, scheduler: str,
             text: TextEncoding = TextEncoding(), denoiser_device: torch.device | None = None) -> DiffusionModel:
    """A loaded (or built) pipeline made ready for sampling and training: the scheduler asked for, every
    part frozen, on `device` (the text encoders stay on the CPU with offloading; the denoiser on
    `denoiser_device` where one is given: --fsdp shards it from the CPU), the text length the family's when
    none is asked for."""
    if text.max_sequence_length is None:
        text = replace(text, max_sequence_length=family.defaults.get("max_sequence_length"))
    if scheduler == "ddim":
        pipe.scheduler = ddim_from(pipe.scheduler.config)
    elif scheduler == "cps":
        pipe.scheduler = CPSScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for part in pipe.components.values():
        if isinstance(part, torch.nn.Module):
            part.requires_grad_(False).eval()
    if family.upcasts_vae(pipe.vae) and pipe.vae.dtype == torch.float16:
        pipe.vae.float()  # for good: switching dtypes around a decode that keeps its graph would break backward
    for name, part in pipe.components.items():
        if isinstance(part, torch.nn.Module) and not (text.offload and name in family.text_encoders):
            part.to(denoiser_device if denoiser_device and name == family.denoiser_name else device)
    return DiffusionModel(pipe=pipe, family=family, text=text)


def _components_left_out(model: str, family: families.Family, text: TextEncoding) -> dict:
    """None for each component the folder was saved without (an SD3 folder without T5: diffusers
    loads it only when told so) and for T5 when it is not wanted."""
    index = DiffusionPipeline.load_config(model, local_files_only=cache_only(model))
    left_out = {name: None for name, entry in index.items() if entry == [None, None]}
    if not text.t5:
        left_out.update(dict.fromkeys(family.t5_components))
    return left_out


def ddim_from(config) -> DDIMScheduler:
    """DDIM with the pipeline scheduler's noise schedule. A config that does not say whether to clip
    x_0 (Euler's, for one) must not get DDIM's default of clipping it to [-1, 1]: that default is for
    pixel-space models, and latents range wider."""
    overrides = {} if "clip_sample" in config else {"clip_sample": False}
    return DDIMScheduler.from_config(config, **overrides)


class CPSScheduler(FlowMatchEulerDiscreteScheduler):
    """RTDMD's coefficients-preserving sampling step for flow models (rtdmd/schedulers/cps_scheduler.py
    in Harahan/RTDMD, after arXiv 2509.05952), with the flow-match Euler scheduler's schedule.

    From the velocity v at x_t: x0 = x_t - sigma v and eps = x_t + (1 - sigma) v; then
    x_next = (1 - sigma_next) x0 + sigma_next (cos(eta pi/2) eps + sin(eta pi/2) noise), so the noise
    keeps the scale sigma_next whatever eta: eta = 0 is the Euler step, eta = 1 re-noises x0 afresh."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
        """Given `sigmas` are the schedule itself, already shifted (RTDMD's 1.0 0.9 0.75 0.5 are its SD3.5
        timesteps 1000 750 500 250 at shift 3): the parent class would shift them a second time. Under
        dynamic shifting (a `mu`) they are shifted by it as the parent does, as RTDMD shifts its FLUX.2
        step list (compute_sigmas_flux2_klein in rtdmd/models/flux2_klein.py: 1000 750 500 250 / 1000)."""
        if sigmas is None or (mu is not None and self.config.use_dynamic_shifting):
            return super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        sigmas = torch.tensor([*sigmas, 0.0], dtype=torch.float32, device=device)
        self.timesteps = sigmas[:-1] * self.config.num_train_timesteps
        self.sigmas = sigmas
        self.num_inference_steps = len(self.timesteps)
        self._step_index = None
        self._begin_index = None

    def step(self, model_output, timestep, sample, eta: float = 0.0, generator=None, return_dict: bool = True):
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        x, v = sample.float(), model_output.float()  # as the Euler step, in float32 whatever the weights
        x0, eps = x - sigma * v, x + (1 - sigma) * v
        angle = eta * math.pi / 2
        prev_sample = (1 - sigma_next) * x0 + sigma_next * math.cos(angle) * eps
        if eta > 0 and sigma_next > 0:  # no draw where the noise has no weight, as RTDMD
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            prev_sample = prev_sample + sigma_next * math.sin(angle) * noise
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)


def schedule_kwargs(model: DiffusionModel, resolution: int, sigmas: tuple[float, ...] = (),
                    num_steps: int | None = None) -> dict:
    """What `scheduler.set_timesteps` takes beyond the step count, as the family's pipeline passes it
    (custom `sigmas`, the `mu` of dynamic shifting)."""
    return model.family.schedule_kwargs(model, resolution, num_steps, sigmas or ())


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
    """LoRA on the attention projections; the adapter starts as the identity (B = 0)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                        target_modules=list(model.family.lora_targets))
    model.denoiser.add_adapter(config)
    for param in model.denoiser.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # trainable weights stay fp32 under bf16 autocast


def enable_full_finetune(model: DiffusionModel, frozen_dtype: torch.dtype = torch.float32, units=(),
                         shard=None) -> None:
    """Train every weight of the denoiser, in fp32; a frozen copy made now, in `frozen_dtype` (the
    training dtype: in fp32 it would double its memory for nothing under bf16 autocast), is the base for
    the KL and annealing. The rest of the pipeline stays as load_model made it (load it in the training
    dtype, the denoiser in fp32). `units` and `shard`: see frozen_copy."""
    model.frozen_base = frozen_copy(model.denoiser, frozen_dtype, units, shard)
    model.denoiser.float().requires_grad_(True).train()


def frozen_copy(network: torch.nn.Module, dtype: torch.dtype, units=(), shard=None) -> torch.nn.Module:
    """A frozen twin of `network` with its floating weights in `dtype`, made without a second whole copy
    in the network's own dtype: the twin's parameters start on the meta device and are filled, cast, from
    the network's, one of its `units` (submodules, in the order to fill them) at a time, then the rest.
    With `shard` (FSDP2's fully_shard), each unit is sharded as soon as it is filled, so that a process
    never holds more than one unit of the copy whole."""
    placeholders = {id(param): torch.nn.Parameter(torch.empty_like(param, device="meta", dtype=_cast(param, dtype)),
                                                  requires_grad=False) for param in network.parameters()}
    buffers = {id(buffer): buffer.to(_cast(buffer, dtype), copy=True) for buffer in network.buffers()}
    twin = copy.deepcopy(network, {**placeholders, **buffers}).requires_grad_(False).eval()
    names = {module: name for name, module in network.named_modules()}
    filled = {}  # placeholder's id -> its weights, so that a weight two modules share stays shared
    for unit in [*units, network]:
        twin_unit, sources = twin.get_submodule(names[unit]), dict(unit.named_parameters(remove_duplicate=False))
        for name, param in list(twin_unit.named_parameters(remove_duplicate=False)):
            if param.is_meta:
                if id(param) not in filled:
                    weights = sources[name].detach().to(param.dtype, copy=True)
                    filled[id(param)] = torch.nn.Parameter(weights, requires_grad=False)
                owner, _, attribute = name.rpartition(".")
                twin_unit.get_submodule(owner)._parameters[attribute] = filled[id(param)]
        if shard is not None:
            shard(twin_unit)
    return twin


def check_compiler(device: torch.device) -> None:
    """Inductor builds its kernels with a compiler of this machine's: C++ for the CPU, a C compiler for
    Triton's launchers on a GPU. Without one the first call would fail deep inside the compile, minutes in."""
    import shutil

    if device.type == "cpu":
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()
        except exc.InvalidCxxCompiler:
            raise UsageError("--compile on the CPU needs a C++ compiler (g++ or clang++): install one, or run "
                             "without --compile") from None
    elif not any(shutil.which(name) for name in (os.environ.get("CC") or "cc", "gcc", "clang")):
        raise UsageError("--compile on a GPU needs a C compiler for Triton (cc, gcc or clang, or $CC): install one, "
                         "or run without --compile")


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a cast of a module to `dtype` gives this tensor: floating ones take it, others keep theirs."""
    return dtype if tensor.is_floating_point() else tensor.dtype


def trainable_parameters(model: DiffusionModel) -> list[torch.nn.Parameter]:
    return [p for p in model.denoiser.parameters() if p.requires_grad]


def compile_denoisers(model: DiffusionModel, backend: str = "inductor") -> None:
    """torch.compile the denoiser, and a full fine-tune's frozen base, in place: the pipeline, the state dict's
    names and the LoraLayers switches keep the same modules. Dynamo guards on each submodule's type, so the
    switches' plain layers and the LoRA layers get a compiled graph each, made once and then picked per call,
    and on grad mode, so the no-grad and graph calls do too; weights (the merged ones, remade after every
    optimizer step) are the graphs' inputs, not guards, and recompile nothing."""
    if backend == "inductor":
        check_compiler(next(model.denoiser.parameters()).device)
    for network in (model.denoiser, model.frozen_base):
        if network is not None:
            network.compile(backend=backend)


class LoraLayers:
    """A network's LoRA layers, found once and switched directly. peft's `disable_adapters()` walks every
    module of the network (~49 ms a toggle on an SDXL-sized UNet) and flips requires_grad on every
    adapter, paid at each KL step and twice per mixed annealing step; and even a disabled LoRA layer
    costs a dispatch through peft's forward per call. Here each switch puts every listed layer's own
    base layer in its place in its parent, so the base and merged calls cost what a plain call costs."""

    def __init__(self, network: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.places = []  # (parent module, attribute name, LoRA layer)
        for name, module in network.named_modules():
            if isinstance(module, BaseTunerLayer):
                parent, _, attribute = name.rpartition(".")
                self.places.append((network.get_submodule(parent), attribute, module))
        self.layers = [layer for _, _, layer in self.places]
        self._merged: list[torch.nn.Parameter] | None = None

    def stale(self) -> None:
        self._merged = None

    @contextlib.contextmanager
    def _plain(self, weights: list[torch.nn.Parameter] | None = None):
        """Every LoRA layer replaced by its base layer (holding `weights`, when given, as its weight)."""
        originals = [layer.base_layer._parameters["weight"] for layer in self.layers]
        for index, (parent, attribute, layer) in enumerate(self.places):
            parent._modules[attribute] = layer.base_layer
            if weights is not None:
                layer.base_layer._parameters["weight"] = weights[index]
        try:
            yield
        finally:
            for (parent, attribute, layer), weight in zip(self.places, originals):
                parent._modules[attribute] = layer
                layer.base_layer._parameters["weight"] = weight

    def disabled(self):
        """The network without its adapters: the pretrained model."""
        return self._plain()

    def merged(self):
        """The network with W + scale * B @ A in place of each W, exactly the LoRA model, at the cost of a
        plain call. The merged weights live in buffers of their own, made once per change of the LoRA
        weights: merging into W and back again would drift bf16 weights."""
        if self._merged is None:
            with torch.no_grad():
                self._merged = [torch.nn.Parameter(_merged_weight(layer), requires_grad=False) for layer in self.layers]
        return self._plain(self._merged)


def _merged_weight(layer) -> torch.Tensor:
    weight = layer.base_layer.weight
    merged = weight.float()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            merged = merged + layer.get_delta_weight(adapter).float()
    return merged.to(weight.dtype)


# ---------------------------------------------------------------------------------------------
# Conditioning and denoisers


class Conditioning(dict):
    """The denoiser's keyword arguments for one batch, and the family that makes each call with them."""

    def __init__(self, family: families.Family, kwargs: dict):
        super().__init__(kwargs)
        self.family = family


@torch.no_grad()
def encode_prompts(model: DiffusionModel, prompts: list[str], guided: bool, resolution: int,
                   embedded_guidance: float | None = None) -> Conditioning:
    """The conditioning of a batch of images `resolution` pixels square: `[uncond; cond]` when `guided`
    (see families.Family.encode_prompts)."""
    with _text_encoders_on_device(model):
        kwargs = model.family.encode_prompts(model, prompts, guided, resolution, embedded_guidance)
    return Conditioning(model.family, kwargs)


@contextlib.contextmanager
def _text_encoders_on_device(model: DiffusionModel):
    """With offloading, the text encoders visit the denoiser's device for one encoding (T5-XXL alone
    is 9 GB that sampling and training never touch)."""
    encoders = [getattr(model.pipe, name, None) for name in model.family.text_encoders] if model.text.offload else []
    encoders = [encoder for encoder in encoders if encoder is not None]
    for encoder in encoders:
        encoder.to(model.denoiser.device)
    try:
        yield
    finally:
        for encoder in encoders:
            encoder.to("cpu")


def make_denoiser(network, conditioning: Conditioning):
    """`network` as a sampling.Denoiser `(latents, t) -> prediction`, called as its family calls it."""
    family = conditioning.family

    def denoise(model_input, t):
        # Under autocast the network answers in bf16, and the flow-match step casts its result to
        # the prediction's dtype: an fp32 trajectory would silently drop to bf16 after one step.
        return family.call(network, model_input, t, conditioning).to(model_input.dtype)

    return denoise


def tuned_denoiser(model: DiffusionModel, conditioning: dict):
    """The tuned model. Its calls without a graph (the first N - K steps, all of inference) run on the
    merged LoRA weights; calls with a graph keep the LoRA layers, whose weights are being trained."""
    denoise = make_denoiser(model.denoiser, conditioning)
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
        return make_denoiser(model.denoiser, conditioning)
    denoise = make_denoiser(model.denoiser, conditioning)

    def denoise_without_adapters(model_input, t):
        with model.lora.disabled():
            return denoise(model_input, t)

    return denoise_without_adapters


def decode(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    """Latents to float images [B,3,H,W] in [0,1], differentiable."""
    return model.family.decode(model, latents)


# ---------------------------------------------------------------------------------------------
# Saving and loading the tuned weights


def save_tuned(model: DiffusionModel, folder: str) -> None:
    """LoRA as diffusers' `pytorch_lora_weights.safetensors` (stock `load_lora_weights` reads
    it), or the full denoiser as a diffusers model folder (`unet/`, `transformer/`)."""
    if model.has_lora:
        from diffusers.training_utils import _collate_lora_metadata
        from peft.utils import get_peft_model_state_dict

        name, layers = model.denoiser_name, get_peft_model_state_dict(model.denoiser)
        if model.family.diffusers_lora_keys:
            layers = convert_state_dict_to_diffusers(layers)
        type(model.pipe).save_lora_weights(folder, **{f"{name}_lora_layers": layers},
                                           **_collate_lora_metadata({name: model.denoiser}))
    else:
        model.denoiser.save_pretrained(os.path.join(folder, model.denoiser_name))


def _denoiser_lora_state(model: DiffusionModel, folder: str) -> dict:
    """The denoiser's LoRA weights of a diffusers LoRA file, in peft's key names."""
    state = type(model.pipe).lora_state_dict(folder)
    if isinstance(state, tuple):  # the UNet families' loaders return (state, network alphas), SD3's the state
        state = state[0]
    prefix = model.denoiser_name + "."
    return convert_unet_state_dict_to_peft({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})


def load_tuned_into_training(model: DiffusionModel, folder: str) -> None:
    """Restore a checkpoint's weights into the already built trainable model (resume)."""
    if model.has_lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model.denoiser, _denoiser_lora_state(model, folder), adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise UsageError(f"checkpoint {folder!r} does not fit this model's LoRA")
        model.lora_changed()
    else:
        tuned = type(model.denoiser).from_pretrained(os.path.join(folder, model.denoiser_name))
        model.denoiser.load_state_dict(tuned.state_dict())


def ema_folder(checkpoint: str) -> str | None:
    """The EMA weights' folder of a checkpoint trained with --ema-decay; None for any other."""
    folder = os.path.join(checkpoint, EMA_DIR)
    return folder if os.path.isdir(folder) else None


def load_checkpoints_for_inference(model: DiffusionModel, checkpoints, lora_alpha: float = RTDMD_LORA_ALPHA,
                                   raw_weights: bool = False) -> None:
    """Make `model` the tuned model of `checkpoints` applied in order, keeping the pretrained one as
    its base: a full fine-tune replaces the denoiser, and LoRAs stack on it (their deltas add, as
    RTDMD merges its cold-start and RL adapters one after the other). A checkpoint holding EMA
    weights gives those, unless `raw_weights`."""
    adapters = []
    for index, checkpoint in enumerate(checkpoints):
        if index and os.path.isdir(os.path.join(checkpoint, model.denoiser_name)):
            raise UsageError(f"checkpoint {checkpoint!r} is a full fine-tune: give it first, and the LoRAs "
                             "that apply on top of it after it")
        adapter = f"tuned_{index}"
        load_checkpoint_for_inference(model, checkpoint, adapter, lora_alpha, raw_weights)
        if adapter in getattr(model.denoiser, "peft_config", {}):
            adapters.append(adapter)
    if adapters:
        model.denoiser.set_adapters(adapters)
        model.denoiser.requires_grad_(False)  # activating adapters makes peft mark them trainable


def load_checkpoint_for_inference(model: DiffusionModel, checkpoint: str, adapter_name: str = "tuned",
                                  lora_alpha: float = RTDMD_LORA_ALPHA, raw_weights: bool = False) -> None:
    """Make `model` the tuned model of `checkpoint`, keeping the pretrained one as its base.

    `checkpoint` is one of ours (a LoRA or a full fine-tune, whose EMA weights are taken where it
    has them, unless `raw_weights`), a PEFT adapter folder (FDFO's), or a file holding a
    torch.save'd LoRA state dict (RTDMD's, whose `lora_alpha` it does not record).
    Weights made for another base model are refused in one line: diffusers would only warn about
    LoRA layers the model lacks, RTDMD's loader skips them, and a full network of another shape
    would load on its own.
    """
    from peft.utils import get_peft_model_state_dict

    trained_from = model_name(checkpoint)
    weights = (None if raw_weights else ema_folder(checkpoint)) or checkpoint
    lora_file = os.path.join(weights, LORA_FILE)
    full_dir = os.path.join(weights, model.denoiser_name)
    peft_folder = os.path.isfile(os.path.join(checkpoint, PEFT_CONFIG))
    if not (os.path.isfile(checkpoint) or peft_folder or os.path.isfile(lora_file) or os.path.isdir(full_dir)):
        sharded = (": it is a sharded --fsdp checkpoint; the final one, and one every --export-every steps, "
                   f"also hold the consolidated {model.denoiser_name}/"
                   ) if os.path.isdir(os.path.join(checkpoint, SHARDED_DIR)) else ""
        raise UsageError(f"checkpoint {checkpoint!r} has neither {LORA_FILE} nor a {model.denoiser_name}/ folder, "
                         f"nor the {PEFT_CONFIG} of a PEFT adapter{sharded}")
    problem = None
    try:
        # diffusers' multi-line report becomes our one line
        with diffusers_quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if os.path.isfile(checkpoint):
                problem = _add_lora_adapter(model, torch.load(checkpoint, map_location="cpu", weights_only=True),
                                            adapter_name, alpha=lora_alpha)
            elif peft_folder:
                problem = _load_peft_adapter(model, checkpoint, adapter_name)
            elif os.path.isfile(lora_file):
                wanted = _denoiser_lora_state(model, weights)
                model.pipe.load_lora_weights(weights, adapter_name=adapter_name)
                unmatched = set(wanted) - set(get_peft_model_state_dict(model.denoiser, adapter_name=adapter_name))
                if unmatched:
                    example = min(unmatched)
                    problem = f"{len(unmatched)} of its {len(wanted)} LoRA weights have no layer here, e.g. {example}"
            else:
                tuned = type(model.denoiser).from_pretrained(full_dir, dtype=model.denoiser.dtype)
                ours, theirs = (json.loads(json.dumps(dict(net.config), default=str)) for net in (model.denoiser, tuned))
                differing = sorted(k for k in ours.keys() | theirs.keys()
                                   if not k.startswith("_") and ours.get(k) != theirs.get(k))
                if differing:
                    label = "UNet" if model.denoiser_name == "unet" else model.denoiser_name
                    problem = f"its {label} differs in {', '.join(differing)}"
                else:
                    model.frozen_base = model.denoiser
                    setattr(model.pipe, model.denoiser_name,
                            tuned.to(model.denoiser.device).requires_grad_(False).eval())
    except Exception as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        problem = next((line for line in lines if line.startswith("size mismatch")), lines[0])
    if problem:
        origin = f"trained from {trained_from!r}" if trained_from else "base model not recorded"
        raise UsageError(f"checkpoint {checkpoint!r} ({origin}) does not fit model {model.pipe.name_or_path!r}: {problem}")


def _load_peft_adapter(model: DiffusionModel, folder: str, adapter_name: str) -> str | None:
    """A LoRA adapter folder as peft's save_pretrained writes it (FDFO's checkpoints), with its own
    rank, alpha and options; returns what keeps it from fitting, if anything."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    with open(os.path.join(folder, PEFT_CONFIG)) as f:
        adapter_config = json.load(f)
    peft_type = adapter_config.get("peft_type")
    if peft_type != "LORA":
        return f"its {PEFT_CONFIG} is of a {peft_type} adapter; only LoRA adapters load"
    if adapter_config.get("use_dora"):
        # The merged no-grad sampler adds B @ A alone to W (LoraLayers), without DoRA's magnitude rescaling.
        return f"its {PEFT_CONFIG} has use_dora: DoRA adapters are not supported, only plain LoRA"
    weights = os.path.join(folder, PEFT_WEIGHTS)
    if not os.path.isfile(weights):
        return f"it has {PEFT_CONFIG} but no {PEFT_WEIGHTS}"
    return _add_lora_adapter(model, load_file(weights), adapter_name, config=LoraConfig.from_pretrained(folder))


# What DDP, torch.compile and a PEFT model put in front of the denoiser's own parameter names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
# peft's factor names, with or without the adapter name (a module's state_dict keeps it, peft's export drops it)
_LORA_KEY = re.compile(r"(?P<layer>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight")


def _unwrapped(key: str) -> str:
    prefix = next((p for p in _WRAPPER_PREFIXES if key.startswith(p)), None)
    return _unwrapped(key.removeprefix(prefix)) if prefix else key


def _is_linear(layer) -> bool:
    """A linear layer, or one that an adapter loaded before has wrapped (stacked LoRAs)."""
    return isinstance(layer, torch.nn.Linear) or isinstance(getattr(layer, "base_layer", None), torch.nn.Linear)


def _add_lora_adapter(model: DiffusionModel, state, adapter_name: str, alpha: float | None = None,
                      config=None) -> str | None:
    """Add the LoRA of `state` as adapter `adapter_name` on exactly the layers it names, with `config`
    (a PEFT folder's) or rank read from its shapes and `alpha`; returns what keeps it from fitting."""
    from peft import LoraConfig, set_peft_model_state_dict

    if not isinstance(state, dict) or not state:
        return "it holds no state dict of LoRA weights"
    factors, keys_of = {}, {}
    for key, tensor in state.items():
        match = _LORA_KEY.fullmatch(_unwrapped(str(key))) if isinstance(tensor, torch.Tensor) else None
        if match is None:
            return f"{key!r} is not a LoRA weight (<layer>.lora_A.weight or <layer>.lora_B.weight)"
        factors[f"{match['layer']}.lora_{match['factor']}.weight"] = tensor
        keys_of.setdefault(match["layer"], []).append(key)
    layers = dict(model.denoiser.named_modules())
    unfit = [key for layer, keys in keys_of.items() if not _is_linear(layers.get(layer)) for key in keys]
    if unfit:
        return f"{len(unfit)} of its {len(state)} LoRA weights have no layer here, e.g. {min(unfit)}"
    halves = [keys[0] for keys in keys_of.values() if len(keys) != 2]
    if halves:
        return f"{halves[0]!r} has no partner: a LoRA layer needs both lora_A and lora_B"
    if config is None:
        ranks = sorted({tensor.shape[0] for key, tensor in factors.items() if ".lora_A." in key})
        if len(ranks) != 1:
            return f"its LoRA layers have ranks {ranks}; one rank is needed to load them with one --lora-alpha"
        config = LoraConfig(r=ranks[0], lora_alpha=alpha)
    model.denoiser.add_adapter(replace(config, target_modules=sorted(keys_of)), adapter_name=adapter_name)
    set_peft_model_state_dict(model.denoiser, factors, adapter_name=adapter_name)
    return None


def model_name(checkpoint: str) -> str | None:
    """The --model a checkpoint was trained from, as its config.json records it; None if it does not
    (a state dict file, RTDMD's, records nothing)."""
    if os.path.isfile(checkpoint):
        return None
    if not os.path.isdir(checkpoint):
        raise UsageError(f"checkpoint {checkpoint!r} is not a folder (nor a LoRA file); give one such as "
                         "RUN_DIR/checkpoints/step-0001000")
    try:
        with open(os.path.join(checkpoint, "config.json")) as f:
            return json.load(f)["model"]
    except (OSError, KeyError, TypeError, ValueError):
        return None

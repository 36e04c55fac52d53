"""Model families: one class each, holding everything that differs between them.

A family is found from the pipeline class its `model_index.json` names. The rest of the code asks
the family, never its name: how to load the pipeline, which network is the denoiser, where LoRA
goes, the defaults of real use, how prompts become the denoiser's keyword arguments, how one
denoiser call is made from `(latents, t)`, the latent shape, the schedule, the decode, and the
blocks FSDP2 shards. The base class is the UNet path of SD; a family overrides what differs.
`model` in the methods is a `models.DiffusionModel` (the loaded pipeline and its options).

Latents stay in the shape the pipeline draws x_T in (`latent_shape`), whatever the network takes:
a family whose network wants them packed packs them in `call` and unpacks the prediction, so the
sampler, the KL and annealing never see the difference.
"""

import contextlib
from typing import ClassVar, NamedTuple

import torch

from utils import UsageError

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


class Guidance(NamedTuple):
    """What the user's guidance settings become for one family."""
    cfg_scale: float  # the sampler's batched classifier-free guidance ([uncond; cond]); 1 or less: none
    embedded: float | None = None  # a guidance value the network takes as an input (a guidance embedding)


class Family:
    """The base class, SD's UNet path: a family sets the class attributes below and overrides the methods
    where its pipeline differs. Families hold no state; `model` carries everything loaded."""

    name: ClassVar[str]  # recorded and shown in messages: "sd", "sdxl", "sd3"
    label: ClassVar[str]  # the family's name for people: "SD", "SDXL", "SD3"
    pipelines: ClassVar[tuple[str, ...]]  # the model_index.json `_class_name`s of this family
    denoiser_name: ClassVar[str] = "unet"  # the pipeline's network attribute; a full fine-tune's folder name
    lora_targets: ClassVar[tuple[str, ...]] = UNET_ATTENTION  # the modules peft puts LoRA on
    # LoRA saved with the key names of diffusers' own LoRA training script for the family: its SD and
    # SDXL scripts convert peft's names to diffusers', its transformer scripts keep peft's
    diffusers_lora_keys: ClassVar[bool] = True
    load_kwargs: ClassVar[dict] = {}  # from_pretrained arguments only this pipeline class accepts
    flow: ClassVar[bool] = False  # the network predicts a velocity; the scheduler is flow matching
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # pipeline attributes offloaded between encodings
    t5_components: ClassVar[tuple[str, ...]] = ()  # what --no-t5 leaves out; empty: the family refuses it
    defaults: ClassVar[dict]  # real-use values of the flags left unset (None)
    train_resolution: ClassVar[int | None] = None  # training image side; None: the model's own

    def __repr__(self) -> str:
        return f"<{self.label} family>"

    def for_checkpoint(self, model: str) -> "Family":
        """The family as checkpoint `model` (folder or hub id) sets it up, read before the pipeline loads:
        here the same for all. A family whose checkpoints differ in their real-use defaults (a
        guidance-distilled one, told by its config) returns an instance holding that checkpoint's."""
        return self

    # -- options

    def validate(self, cfg) -> None:
        """Refuse, in one line, the options of `cfg` (defaults filled in) that this family does not take."""
        if cfg.scheduler == "cps" and not self.flow:
            raise UsageError(f"--sampler cps is a step for flow-matching models (SD3); this model is {self.name}")
        if cfg.scheduler == "ddim" and self.flow:
            raise UsageError("--scheduler ddim is for SD and SDXL; this flow-matching model samples with its "
                             "pipeline scheduler (the default) or cps")
        if getattr(cfg, "no_t5", False) and not self.t5_components:
            raise UsageError(f"--no-t5: this model ({self.name}) has no T5 encoder")

    def guidance(self, model, settings) -> Guidance:
        """The guidance of the sampler settings (`generation.SamplerSettings`: --guidance-scale and the
        like) as this family's pipeline applies it to this model: here --guidance-scale is the sampler's
        classifier-free guidance. A family may embed a scale instead, or decide from the model's config."""
        return Guidance(settings.guidance_scale)

    # -- conditioning and the denoiser call

    def encode_prompts(self, model, prompts: list[str], guided: bool, resolution: int,
                       embedded_guidance: float | None = None) -> dict:
        """The denoiser's keyword arguments for a batch of `prompts`, images `resolution` pixels square:
        `[uncond; cond]` when `guided`, the empty prompt as negative, exactly as the pipeline's own
        encode_prompt builds them. Runs without a graph, the text encoders on the denoiser's device."""
        positive, negative = model.pipe.encode_prompt(prompts, model.denoiser.device, 1, guided, negative_prompt=None)
        return {"encoder_hidden_states": torch.cat([negative, positive]) if guided else positive}

    def call(self, network, latents: torch.Tensor, t: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """One call of `network` (the tuned denoiser or the base) on latents shaped as `latent_shape`,
        returning its prediction in that shape."""
        # One timestep per sample, as the SD3 pipeline passes it (the UNet expands a scalar itself).
        return network(latents, timestep=t.expand(len(latents)), **conditioning, return_dict=False)[0]

    def latent_shape(self, model, batch: int, resolution: int) -> tuple[int, ...]:
        """The shape the pipeline draws x_T in, one generator per sample."""
        side = resolution // model.pipe.vae_scale_factor
        return (batch, model.denoiser.config.in_channels, side, side)

    def schedule_kwargs(self, model, resolution: int, num_steps: int | None, sigmas: tuple[float, ...] = ()) -> dict:
        """What `scheduler.set_timesteps` takes beyond the step count: here the given `sigmas` (cps)."""
        return {"sigmas": list(sigmas)} if sigmas else {}

    def decode(self, model, latents: torch.Tensor) -> torch.Tensor:
        """Latents to float images [B,3,H,W] in [0,1], differentiable."""
        vae = model.pipe.vae
        z = latents / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None):
            z = z + vae.config.shift_factor
        with _fp16_autocast_suspended(vae) if self.upcasts_vae(vae) else contextlib.nullcontext():
            images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def upcasts_vae(self, vae) -> bool:
        """Whether the VAE is kept, and decodes, in fp32 when the weights are fp16."""
        return False

    # -- sizes and sharding

    def default_resolution(self, model) -> int:
        return model.denoiser.config.sample_size * model.pipe.vae_scale_factor

    def resolution_multiple(self, model) -> int:
        """Image sides must divide into latent pixels, and those into the transformer's patches."""
        return model.pipe.vae_scale_factor * getattr(model.denoiser.config, "patch_size", 1)

    def shard_units(self, network: torch.nn.Module) -> list[torch.nn.Module]:
        """The blocks FSDP2 shards one by one: a UNet's down, mid and up blocks. Block checkpointing is
        diffusers' own `enable_gradient_checkpointing`, which recomputes within these same blocks."""
        return [*network.down_blocks, network.mid_block, *network.up_blocks]


class SD(Family):
    name, label = "sd", "SD"
    pipelines = ("StableDiffusionPipeline",)
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}
    # As NeMo-Aligner's DRaFT+ trains and samples SD.
    defaults = dict(scheduler="ddim", inference_steps=50, guidance_scale=7.5, lora_rank=32, lora_alpha=32.0)


class SDXL(Family):
    name, label = "sdxl", "SDXL"
    pipelines = ("StableDiffusionXLPipeline",)
    text_encoders = ("text_encoder", "text_encoder_2")
    defaults = SD.defaults

    def encode_prompts(self, model, prompts, guided, resolution, embedded_guidance=None):
        """Both encoders' hidden states, and the added condition: the second encoder's pooled embedding
        and the time ids of an uncropped image generated at its own size, as the SDXL pipeline's
        defaults make them (its encode_prompt zeroes the negative when force_zeros_for_empty_prompt)."""
        pipe = model.pipe
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

    def upcasts_vae(self, vae) -> bool:
        """SDXL's VAE overflows in fp16, which its config flags with force_upcast, and the SDXL pipeline
        then decodes in fp32. bf16 has fp32's range, so only fp16 is avoided."""
        return bool(vae.config.force_upcast)


class SD3(Family):
    name, label = "sd3", "SD3"
    pipelines = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"
    # The joint attention, as FDFO and RTDMD (and diffusers' SD3 LoRA script) target it: the image and the
    # text projections of each block's `attn`; the second image-only `attn2` of SD3.5's dual-attention
    # blocks stays untouched, as in both.
    lora_targets = tuple(f"attn.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                     "add_v_proj", "to_add_out"))
    diffusers_lora_keys = False
    flow = True
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    t5_components = ("text_encoder_3", "tokenizer_3")
    # As FDFO samples (40 steps; CFG 4.5, its eval/models.py run_pipe default) and as FDFO and RTDMD
    # train (LoRA rank 32, alpha 64, 512 px).
    defaults = dict(scheduler="pipeline", inference_steps=40, guidance_scale=4.5, lora_rank=32, lora_alpha=64.0)
    train_resolution = 512

    def encode_prompts(self, model, prompts, guided, resolution, embedded_guidance=None):
        """Both CLIPs' penultimate hidden states beside T5's (zeros without T5), and both CLIPs' pooled
        embeddings, as StableDiffusion3Pipeline.encode_prompt builds them; the negative is the encoded
        empty prompt."""
        positive, negative, pooled, negative_pooled = model.pipe.encode_prompt(
            prompts, None, None, device=model.denoiser.device, num_images_per_prompt=1,
            do_classifier_free_guidance=guided, max_sequence_length=model.text.max_sequence_length,
        )
        if guided:
            positive, pooled = torch.cat([negative, positive]), torch.cat([negative_pooled, pooled])
        return {"encoder_hidden_states": positive, "pooled_projections": pooled}

    def schedule_kwargs(self, model, resolution, num_steps, sigmas=()):
        """The given `sigmas`, and the `mu` of dynamic shifting where the scheduler's config asks for it,
        computed from the image's token count as StableDiffusion3Pipeline computes it."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        kwargs = super().schedule_kwargs(model, resolution, num_steps, sigmas)
        config = model.scheduler.config
        if config.get("use_dynamic_shifting"):
            side = resolution // self.resolution_multiple(model)
            kwargs["mu"] = calculate_shift(side * side, config.get("base_image_seq_len", 256),
                                           config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                           config.get("max_shift", 1.16))
        return kwargs

    def shard_units(self, network):
        """Each transformer block."""
        return list(network.transformer_blocks)


@contextlib.contextmanager
def _fp16_autocast_suspended(vae):
    """An fp32 VAE under fp16 autocast would run in fp16 after all."""
    device_type = vae.device.type
    fp16 = (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) == torch.float16)  # (the meta device has no autocast)
    with torch.autocast(device_type, enabled=False) if fp16 else contextlib.nullcontext():
        yield


FAMILIES: tuple[Family, ...] = (SD(), SDXL(), SD3())


def of_pipeline(class_name: str) -> Family | None:
    """The family whose pipeline class is `class_name`; None if no family is."""
    return next((family for family in FAMILIES if class_name in family.pipelines), None)


def pipeline_names() -> list[str]:
    """Every pipeline class a family matches, for messages."""
    return [name for family in FAMILIES for name in family.pipelines]

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
import os
from typing import ClassVar, NamedTuple

import numpy as np
import torch

import utils
from utils import UsageError

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
MAX_T5_TOKENS = 512  # FluxPipeline refuses longer prompts


class Guidance(NamedTuple):
    """What the user's guidance settings become for one family."""
    cfg_scale: float  # the sampler's batched classifier-free guidance ([uncond; cond]); 1 or less: none
    embedded: float | None = None  # a guidance value the network takes as an input (a guidance embedding)


class Family:
    """The base class, SD's UNet path: a family sets the class attributes below and overrides the methods
    where its pipeline differs. Families hold no state; `model` carries everything loaded."""

    name: ClassVar[str]  # recorded and shown in messages: "sd", "sdxl", "sd3", "flux"
    label: ClassVar[str]  # the family's name for people: "SD", "SDXL", "SD3", "FLUX.1"
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
    true_cfg: ClassVar[bool] = False  # takes --true-cfg-scale (CFG beside a guidance embedding)
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
        if getattr(cfg, "true_cfg_scale", None) is not None and not self.true_cfg:
            raise UsageError(f"--true-cfg-scale is for FLUX.1's guidance-distilled models; this model ({self.name}) "
                             "takes its classifier-free guidance from --guidance-scale")

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
    defaults = dict(scheduler="pipeline", inference_steps=40, guidance_scale=4.5, lora_rank=32, lora_alpha=64.0,
                    max_sequence_length=256)  # T5 tokens, the pipeline's default
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


class PackedTransformer(Family):
    """What FLUX.1 and FLUX.2 share: a flow-matching transformer of double- and single-stream blocks on
    latents packed 2x2 into tokens, trained at 512 px, its LoRA saved with peft's key names."""
    denoiser_name = "transformer"
    diffusers_lora_keys = False
    flow = True
    train_resolution = 512

    def default_resolution(self, model):
        """The pipeline's default height and width."""
        return model.pipe.default_sample_size * model.pipe.vae_scale_factor

    def resolution_multiple(self, model):
        """Latent pixels, and 2x2 of them to a packed token."""
        return model.pipe.vae_scale_factor * 2

    def shard_units(self, network):
        """Each double-stream and each single-stream block."""
        return [*network.transformer_blocks, *network.single_transformer_blocks]


class Flux(PackedTransformer):
    """FLUX.1 [dev], Krea [dev] and [schnell] (FluxPipeline): a transformer of double- and single-stream
    blocks on 2x2-packed latents with RoPE position ids, conditioned on CLIP's pooled output and T5's
    sequence. Guidance-distilled checkpoints (transformer config `guidance_embeds`) take the guidance
    scale as an input; true CFG against the empty prompt is --true-cfg-scale, as FluxPipeline's."""
    name, label = "flux", "FLUX.1"
    pipelines = ("FluxPipeline",)
    # As diffusers' FLUX LoRA script (examples/dreambooth/train_dreambooth_lora_flux.py) and Flow-GRPO
    # (scripts/train_flux.py) set them: every attention projection of the double-stream blocks, image and
    # text, with both streams' feed-forwards, and q/k/v of the single-stream blocks (whose attention has
    # no output projection). FLUX's prompt following lives in the text stream and its MLPs as much as in
    # the image attention, and the LoRAs shared for FLUX.1 are trained on these layers.
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2")
    text_encoders = ("text_encoder", "text_encoder_2")
    true_cfg = True
    # FLUX.1-dev as FluxPipeline samples it (28 steps, guidance 3.5, 512 T5 tokens, no true CFG); LoRA
    # rank 64 and alpha 128 as Flow-GRPO trains FLUX.1-dev (scripts/train_flux.py), at 512 px (its
    # config/grpo.py pickscore_flux).
    defaults = dict(scheduler="pipeline", inference_steps=28, guidance_scale=3.5, true_cfg_scale=1.0,
                    max_sequence_length=MAX_T5_TOKENS, lora_rank=64, lora_alpha=128.0)

    def for_checkpoint(self, model):
        """A checkpoint without the guidance embedding is timestep-distilled, as FLUX.1-schnell is."""
        from diffusers import FluxTransformer2DModel

        cache_only = not os.path.isdir(model) and not utils.hub_reachable()  # as models.load_model reads it
        try:
            config = FluxTransformer2DModel.load_config(model, subfolder="transformer", local_files_only=cache_only)
        except Exception as error:  # hub, network and file errors alike end in one line
            raise UsageError(f"cannot read the transformer config of model {model!r}: {str(error).strip()[:200]}"
                             ) from None
        return self if config.get("guidance_embeds") else FluxDistilled()

    def validate(self, cfg) -> None:
        if getattr(cfg, "no_t5", False):
            raise UsageError("--no-t5: FLUX.1 cannot run without its T5 encoder; --offload-text-encoders keeps "
                             "it on the CPU between encodings")
        if cfg.scheduler == "cps":
            raise UsageError("--sampler cps is not supported for FLUX.1, which samples with its pipeline's "
                             "flow-match Euler scheduler (the default)")
        super().validate(cfg)
        if cfg.true_cfg_scale < 1:
            raise UsageError(f"--true-cfg-scale must be >= 1 (1 is off), got {cfg.true_cfg_scale}")
        if getattr(cfg, "max_sequence_length", 0) > MAX_T5_TOKENS:
            raise UsageError(f"--max-sequence-length must be at most {MAX_T5_TOKENS} for FLUX.1, got "
                             f"{cfg.max_sequence_length}")

    def guidance(self, model, settings):
        """True CFG is the sampler's batched guidance; --guidance-scale is the embedded guidance, which
        a checkpoint without the embedding ignores, as the pipeline does."""
        embedded = settings.guidance_scale if model.denoiser.config.guidance_embeds else None
        return Guidance(settings.true_cfg_scale, embedded)

    def encode_prompts(self, model, prompts, guided, resolution, embedded_guidance=None):
        """T5's sequence of --max-sequence-length tokens, CLIP's pooled output and the text ids, by
        FluxPipeline.encode_prompt; the negative of true CFG is the encoded empty prompt."""
        def encode(texts):
            return model.pipe.encode_prompt(texts, device=model.denoiser.device,
                                            max_sequence_length=model.text.max_sequence_length)

        hidden, pooled, text_ids = encode(prompts)
        if guided:
            negative, negative_pooled, _ = encode([""] * len(prompts))
            hidden, pooled = torch.cat([negative, hidden]), torch.cat([negative_pooled, pooled])
        conditioning = {"encoder_hidden_states": hidden, "pooled_projections": pooled, "txt_ids": text_ids}
        if embedded_guidance is not None:
            conditioning["guidance"] = torch.tensor([embedded_guidance], device=model.denoiser.device)
        return conditioning

    def call(self, network, latents, t, conditioning):
        """As FluxPipeline's loop calls the transformer: the latents packed into 2x2 patches with their
        position ids, the timestep / 1000 and the guidance (float32) per sample; the velocity unpacked."""
        from diffusers import FluxPipeline

        batch, channels, height, width = latents.shape
        kwargs = dict(conditioning)
        if "guidance" in kwargs:
            kwargs["guidance"] = kwargs["guidance"].expand(batch)
        packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
        out = network(hidden_states=packed, timestep=t.expand(batch).to(latents.dtype) / 1000, img_ids=image_ids,
                      **kwargs, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, height, width, 1)  # sides given in latent pixels: factor 1

    def latent_shape(self, model, batch, resolution):
        """The unpacked shape FluxPipeline.prepare_latents draws x_T in, before it packs them."""
        side = 2 * (resolution // self.resolution_multiple(model))
        return (batch, model.denoiser.config.in_channels // 4, side, side)

    def schedule_kwargs(self, model, resolution, num_steps, sigmas=()):
        """FluxPipeline's sigmas (1 to 1/N, evenly spaced) and its `mu` of dynamic shifting from the
        image's token count (a scheduler without dynamic shifting, schnell's, ignores it)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = model.scheduler.config
        tokens = (resolution // self.resolution_multiple(model)) ** 2
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}


class FluxDistilled(Flux):
    """A FLUX.1 checkpoint without the guidance embedding (FLUX.1-schnell), with the settings diffusers'
    FLUX documentation samples schnell with: 4 steps, guidance 0, 256 T5 tokens."""
    defaults = {**Flux.defaults, "inference_steps": 4, "guidance_scale": 0.0, "max_sequence_length": 256}

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if cfg.guidance_scale:
            raise UsageError(f"--guidance-scale {cfg.guidance_scale}: this FLUX.1 checkpoint has no guidance embedding "
                             "(schnell-like); leave it out, or guide with --true-cfg-scale")


class Flux2Klein(PackedTransformer):
    """FLUX.2 [klein] (Flux2KleinPipeline): the base 4B/9B, guided with real classifier-free guidance,
    and the step-distilled 4B/9B, never guided, as the pipeline decides from `is_distilled` in its
    model_index.json. Prompts are Qwen3's hidden states of the chat-templated prompt at the pipeline's
    `text_encoder_out_layers`, with 4-axis (T, H, W, L) ids. Latents are AutoencoderKLFlux2's,
    patchified 2x2 and normalised with its batch-norm statistics: the pipeline draws x_T in that
    shape, [B, 4 C, H / 16, W / 16], and the trajectory stays in it; `call` packs them into tokens
    and back with the pipeline's own helpers."""
    name, label = "flux2", "FLUX.2 [klein]"
    pipelines = ("Flux2KleinPipeline",)
    # As diffusers' klein LoRA script (examples/dreambooth/train_dreambooth_lora_flux2_klein.py) targets
    # them by default: the image-stream attention of the double-stream blocks, and each single-stream
    # block's fused qkv-and-MLP input and its output (24 of them cover klein 9B; 4B has 20).
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                    *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(24)))
    # The pipeline's defaults for the base models (50 steps, CFG 4, 512 Qwen3 tokens); LoRA rank 32,
    # alpha 64 and 512 px as RTDMD trains FLUX.2-klein-4B (configs/rtdmd/flux2_4b.yaml).
    defaults = dict(scheduler="pipeline", inference_steps=50, guidance_scale=4.0, lora_rank=32, lora_alpha=64.0,
                    max_sequence_length=512)
    # The distilled models as their model cards sample them: 4 steps, no guidance.
    distilled_defaults = {**defaults, "inference_steps": 4, "guidance_scale": 1.0}
    text_encoder_out_layers = (9, 18, 27)  # the pipeline's default, which no config records

    def __init__(self, distilled: bool = False):
        self.distilled = distilled
        self.defaults = self.distilled_defaults if distilled else type(self).defaults

    def for_checkpoint(self, model: str) -> "Flux2Klein":
        """The base or the distilled model, as `is_distilled` in its model_index.json says (which
        detect_family has just read: the folder or the hub cache holds it)."""
        from diffusers import DiffusionPipeline

        index = DiffusionPipeline.load_config(model, local_files_only=True)
        return Flux2Klein(distilled=bool(index.get("is_distilled", False)))

    def validate(self, cfg) -> None:
        super().validate(cfg)
        if self.distilled and cfg.guidance_scale > 1:
            raise UsageError(f"--guidance-scale {cfg.guidance_scale}: this step-distilled FLUX.2 [klein] model "
                             "(is_distilled in its model_index.json) samples without guidance; leave it out or give 1")

    def guidance(self, model, settings) -> Guidance:
        """Real CFG with --guidance-scale, except for a distilled model: none, exactly as
        Flux2KleinPipeline.do_classifier_free_guidance decides it from the pipeline's config."""
        return Guidance(1.0 if model.pipe.config.is_distilled else settings.guidance_scale)

    def encode_prompts(self, model, prompts, guided, resolution, embedded_guidance=None):
        """The pipeline's encode_prompt: the stacked hidden states and their text ids, the encoded empty
        prompt as the negative, as the pipeline builds it for CFG."""
        def encoded(texts):
            return model.pipe.encode_prompt(texts, model.denoiser.device, 1,
                                            max_sequence_length=model.text.max_sequence_length,
                                            text_encoder_out_layers=self.text_encoder_out_layers)

        hidden, ids = encoded(prompts)
        if guided:
            negative, negative_ids = encoded([""] * len(prompts))
            hidden, ids = torch.cat([negative, hidden]), torch.cat([negative_ids, ids])
        return {"encoder_hidden_states": hidden, "txt_ids": ids}

    def call(self, network, latents, t, conditioning):
        """Packed into tokens with their ids, the timestep as the pipeline scales it (a fraction of
        1000), no guidance embedding (klein has none), and the prediction scattered back by its ids."""
        from diffusers import Flux2KleinPipeline as pipeline

        tokens = pipeline._pack_latents(latents)
        ids = pipeline._prepare_latent_ids(latents).to(latents.device)
        timestep = t.expand(len(latents)).to(latents.dtype) / 1000
        out = network(hidden_states=tokens.to(network.dtype), timestep=timestep, guidance=None, img_ids=ids,
                      **conditioning, return_dict=False)[0]
        return pipeline._unpack_latents_with_ids(out[:, :tokens.shape[1]], ids, *latents.shape[2:])

    def latent_shape(self, model, batch, resolution):
        side = resolution // self.resolution_multiple(model)
        return (batch, model.denoiser.config.in_channels, side, side)

    def schedule_kwargs(self, model, resolution, num_steps, sigmas=()):
        """The pipeline's sigmas (linspace(1, 1/N, N), or the given ones) and the `mu` it computes from
        the image's token count and the step count, by which the scheduler shifts them (the cps step
        too: RTDMD samples FLUX.2 from its step list shifted so)."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        sigmas = list(sigmas) or list(np.linspace(1.0, 1 / num_steps, num_steps))
        side = resolution // self.resolution_multiple(model)
        kwargs = {"mu": compute_empirical_mu(image_seq_len=side * side, num_steps=len(sigmas))}
        if not model.scheduler.config.get("use_flow_sigmas"):
            kwargs["sigmas"] = sigmas
        return kwargs

    def decode(self, model, latents):
        vae = model.pipe.vae
        images = vae.decode(self.vae_latents(model, latents).to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def vae_latents(self, model, latents):
        """The VAE's latents of the trajectory's: denormalised with the VAE's batch-norm statistics
        and unpatchified, as the pipeline does before it decodes (its output_type="latent")."""
        from diffusers import Flux2KleinPipeline as pipeline

        bn, eps = model.pipe.vae.bn, model.pipe.vae.config.batch_norm_eps
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps).to(latents.device, latents.dtype)
        return pipeline._unpatchify_latents(latents * std + mean)



@contextlib.contextmanager
def _fp16_autocast_suspended(vae):
    """An fp32 VAE under fp16 autocast would run in fp16 after all."""
    device_type = vae.device.type
    fp16 = (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) == torch.float16)  # (the meta device has no autocast)
    with torch.autocast(device_type, enabled=False) if fp16 else contextlib.nullcontext():
        yield


FAMILIES: tuple[Family, ...] = (SD(), SDXL(), SD3(), Flux(), Flux2Klein())


def of_pipeline(class_name: str) -> Family | None:
    """The family whose pipeline class is `class_name`; None if no family is."""
    return next((family for family in FAMILIES if class_name in family.pipelines), None)


def pipeline_names() -> list[str]:
    """Every pipeline class a family matches, for messages."""
    return [name for family in FAMILIES for name in family.pipelines]

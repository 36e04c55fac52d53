"""Memory of a DRaFT+ training step per GPU, from the real models' configurations (configs/real), by arithmetic.

    python memory.py                         # the tables of docs/performance.md: every shipped model, the usual modes
    python memory.py --models sdxl --lora-ranks 32 --gpus 1 8

Weights, gradients and optimizer state come from the networks' parameter counts (built on the meta device). The
activations come from tracing one step's parts on the meta device at the real shapes: the bytes each part saves
for backward (the denoiser's call, the VAE decode, the reward), with attention saving what the fused kernels of
a GPU save (its inputs, output and log-sum-exp, not the attention matrix), combined as the checkpointing mode
holds them, with the gradients backward holds beside what it recomputes; and the peaks of the step's work
without a graph (encoding the prompts, a no-grad call of the denoiser), traced on the meta device by following
every tensor made until it is freed. tests/test_memory.py checks the model against measured CPU peaks.
"""

import contextlib
import tempfile
import weakref
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import shapes

GiB = 2**30
BF16, FP32 = 2, 4
# While backward runs through a recomputed unit's widest layer it holds two gradients of that layer's size
# beside the unit's saved tensors: of its output and of its input. Against the measured CPU peaks of
# tests/test_memory.py one such gradient under-predicts the checkpointed steps by up to 17%, two keep all
# within 11%.
GRADIENTS_PER_LAYER = 2
ADAM_STATE = 2 * FP32  # exp_avg and exp_avg_sq, fp32 like the trainable weights


@dataclass(frozen=True)
class Mode:
    resolution: int  # image side
    batch: int = 1  # prompts per GPU
    lora_rank: int | None = 32  # None: full fine-tune
    gpus: int = 1  # --fsdp over this many GPUs (full fine-tune only)
    offload_text: bool = False  # --offload-text-encoders
    truncation: int = 1  # K
    # none; the per-call checkpoint alone at K > 1 (--checkpoint-calls-only; at K = 1 the blocks); calls and blocks
    checkpointing: Literal["", "steps", "blocks"] = "blocks"
    guided: bool = True  # the family's default guidance (CFG doubles the denoiser's batch; FLUX.1-dev embeds it)
    weight_bytes: int = BF16  # frozen weights and activations: bf16 on a GPU, fp32 on the CPU


@dataclass(frozen=True)
class Unit:
    """One checkpointed unit of a part, as the forward met it: what it saves for backward, the largest single
    tensor of those, and what is held when backward reaches it: without checkpointing all the part saved before
    it, with the units checkpointed what the part saved outside the units before it and the inputs of the units
    up to this one."""
    saved: int
    largest: int
    saved_before: int
    held_before: int


@dataclass(frozen=True)
class Saved:
    """What one part of the step saves for backward: in all, and per checkpointed unit."""
    total: int
    units: tuple[Unit, ...]
    unit_inputs: int

    def held(self, checkpointed: bool) -> int:
        """Held from the forward until backward: everything, or with the units checkpointed only what lies
        outside them and their inputs."""
        return self.total - sum(u.saved for u in self.units) + self.unit_inputs if checkpointed else self.total

    def backward_peak(self, checkpointed: bool) -> int:
        """The most held at once while backward runs through the part. Backward starts with all that is held,
        then runs through the units from the last, each unit's saved tensors (recomputed, with the units
        checkpointed) beside what is still held of what came before it and the gradients of its widest layer."""
        in_units = ((u.held_before if checkpointed else u.saved_before) + u.saved + GRADIENTS_PER_LAYER * u.largest
                    for u in self.units)
        return max([self.held(checkpointed), *in_units])


@dataclass(frozen=True)
class Estimate:
    weights: int  # the denoiser's weights (fp32 trainable with full fine-tuning), shard included
    gradients: int
    optimizer: int
    frozen: int  # frozen networks: text encoders (unless offloaded), VAE, reward, the base copy or merged LoRA weights
    activations: int  # the peak of what the step's graph holds (calibrated)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.frozen + self.activations


# ---------------------------------------------------------------------------------------------
# Tracing on the meta device


class FusedAttentionShape(torch.autograd.Function):
    """Scaled dot-product attention as the fused GPU kernels hold it for backward (query, key, value, output
    and a float32 log-sum-exp per query), computing only shapes: on the meta device the math fallback would
    save the whole attention matrix, which no GPU kernel keeps."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


@contextlib.contextmanager
def fused_attention_shapes():
    original = torch.nn.functional.scaled_dot_product_attention

    def attention(query, key, value, *args, **kwargs):
        return FusedAttentionShape.apply(query, key, value)

    torch.nn.functional.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def trace_saved(fn, network: torch.nn.Module, units: list[torch.nn.Module]) -> Saved:
    """The bytes `fn` saves for backward, parameters left out (they are counted as weights), storages counted
    once, and what each of `units` saves and is given."""
    parameters = {p.untyped_storage()._cdata for p in network.parameters()}
    saved: dict[int, int] = {}  # in the order first saved
    inputs: dict[int, int] = {}
    records, starts = [], []

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    def before(module, args, kwargs):
        for tensor in [*args, *kwargs.values()]:
            if isinstance(tensor, torch.Tensor):
                inputs[tensor.untyped_storage()._cdata] = tensor.untyped_storage().nbytes()
        outside = sum(saved.values()) - sum(unit.saved for unit in records)
        starts.append((len(saved), sum(saved.values()), outside + sum(inputs.values())))

    def after(module, args, output):
        first, saved_before, held_before = starts.pop()
        new = list(saved.values())[first:]
        records.append(Unit(sum(new), max(new, default=0), saved_before, held_before))

    handles = [h for unit in units for h in (unit.register_forward_pre_hook(before, with_kwargs=True),
                                             unit.register_forward_hook(after))]
    try:
        with fused_attention_shapes(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
    finally:
        for handle in handles:
            handle.remove()
    return Saved(sum(saved.values()), tuple(records), sum(inputs.values()))


class LiveBytes(TorchDispatchMode):
    """The most bytes that the tensors made inside hold at once, storages counted once: the peak of a no-grad
    computation, traced on the meta device. A tensor is counted from the op that makes it until it is freed
    (weights, made outside, are not counted)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage -> [its bytes, tensors alive on it]
        self.held = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.track(tensor)
        return out

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        entry = self.live.setdefault(storage._cdata, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.held += entry[0]
            self.peak = max(self.peak, self.held)
        entry[1] += 1
        weakref.finalize(tensor, self.release, storage._cdata)

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.held -= entry[0]
            del self.live[key]


def no_grad_peak(fn) -> int:
    """The most `fn` holds at once, run without a graph."""
    with torch.no_grad(), fused_attention_shapes(), LiveBytes() as live:
        fn()
    return live.peak


@dataclass(frozen=True)
class StepParts:
    """The step's parts at one shape: what each saves for backward, the peaks of the no-grad work of a step
    (encoding its prompts, a no-grad call of the denoiser), and the parameter counts."""
    denoiser: Saved
    decode: Saved
    reward: Saved
    encode_peak: int
    no_grad_call_peak: int
    call_input: int  # one graph call's input latents (held per call with per-call checkpointing)
    denoiser_parameters: int
    lora_per_rank: int  # LoRA parameters at rank 1: they grow with the rank, r x (inputs + outputs) a layer
    lora_targeted: int  # weights under LoRA layers: the merged-LoRA sampler holds a copy of them
    largest_block: int  # parameters of the largest block FSDP shards (gathered whole in its turn)
    text_parameters: int
    vae_parameters: int
    reward_parameters: int


def checkpointed_units(blocks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """What diffusers' gradient checkpointing recomputes as one: in a UNet block each resnet, and inside each
    attention (a Transformer2DModel) each of its transformer blocks, the attention's own projections and norm
    left outside; a transformer's blocks whole."""
    def units(block):
        attentions = getattr(block, "attentions", None) or []
        inner = [unit for attention in attentions for unit in getattr(attention, "transformer_blocks", [attention])]
        return [*getattr(block, "resnets", []), *inner] or [block]

    return [unit for block in blocks for unit in units(block)]


def default_sampler_settings(family, mode: Mode):
    """The family's real-use guidance at the mode's shape (one step: the step count shapes no call)."""
    import generation

    scales = {"true_cfg_scale": family.defaults["true_cfg_scale"]} if "true_cfg_scale" in family.defaults else {}
    return generation.SamplerSettings(mode.resolution, 1, family.defaults["guidance_scale"], **scales)


def trace_step(model: str, reward_backbone: str, mode: Mode) -> StepParts:
    """Build the model and reward on the meta device through the training code's loaders, encode prompts and
    trace one graph call of the denoiser, the decode and the reward at the mode's shape."""
    import models
    import sampling

    dtype = torch.bfloat16 if mode.weight_bytes == BF16 else torch.float32
    with tempfile.TemporaryDirectory() as workdir:
        model_ = shapes.random_weights_loader(workdir)(shapes.model_folder(model), torch.device("meta"), dtype)
        reward = shapes.random_pickscore_loader(workdir, reward_backbone)("pickscore", dtype=dtype, device="meta")
        prompts = ["a photograph of an astronaut riding a horse"] * mode.batch
        guidance = model_.family.guidance(model_, default_sampler_settings(model_.family, mode))
        guided = mode.guided and sampling.uses_guidance(guidance.cfg_scale)
        encode = lambda: models.encode_prompts(model_, prompts, guided, mode.resolution, guidance.embedded)  # noqa: E731
        encode_peak = no_grad_peak(encode)
        conditioning = encode()
    denoiser = model_.denoiser
    denoiser_parameters = shapes.parameter_count(denoiser)
    models.attach_lora(model_, mode.lora_rank or 1, mode.lora_rank or 1)
    lora_per_rank = sum(p.numel() for name, p in denoiser.named_parameters() if "lora_" in name) // (mode.lora_rank or 1)
    targeted = sum(layer.base_layer.weight.numel() for layer in model_.lora.layers)
    shape = model_.latent_shape(mode.batch, mode.resolution)
    latents = torch.empty(shape, device="meta", dtype=dtype, requires_grad=True)
    model_input = torch.cat([latents, latents]) if guided else latents
    call = models.make_denoiser(denoiser, conditioning)
    no_grad_call_peak = no_grad_peak(lambda: call(model_input.detach(), torch.tensor(500.0, device="meta")))
    blocks = model_.family.shard_units(denoiser)
    denoiser_saved = trace_saved(lambda: call(model_input, torch.tensor(500.0, device="meta")), denoiser,
                                 checkpointed_units(blocks))
    vae = model_.pipe.vae
    decode_saved = trace_saved(lambda: models.decode(model_, latents), vae,
                               [vae.decoder.mid_block, *vae.decoder.up_blocks])
    images = torch.empty(mode.batch, 3, mode.resolution, mode.resolution, device="meta", requires_grad=True)
    clip = reward.rewards["pickscore"].model
    reward_saved = trace_saved(lambda: reward(images, prompts), clip, list(clip.vision_model.encoder.layers))
    text = sum(shapes.parameter_count(getattr(model_.pipe, name)) for name in model_.family.text_encoders
               if getattr(model_.pipe, name, None) is not None)
    return StepParts(denoiser_saved, decode_saved, reward_saved, encode_peak, no_grad_call_peak,
                     model_input.numel() * mode.weight_bytes,
                     denoiser_parameters, lora_per_rank, targeted, max(shapes.parameter_count(b) for b in blocks), text,
                     shapes.parameter_count(vae), shapes.parameter_count(clip))


# ---------------------------------------------------------------------------------------------
# The arithmetic


def activation_bytes(parts: StepParts, mode: Mode) -> int:
    """The peak of what the graph holds: what the forward leaves held until backward, or, during backward, what
    is still held plus the part being recomputed. Per-call checkpointing (K > 1) holds each call's input and
    recomputes one call (with its units checkpointed inside it, or not); at K = 1 --gradient-checkpointing
    checkpoints the units."""
    per_call = mode.checkpointing != "" and mode.truncation > 1
    units = mode.checkpointing == "blocks" or (mode.checkpointing == "steps" and mode.truncation == 1)
    denoiser, k = parts.denoiser, mode.truncation
    if per_call:
        calls_held = k * parts.call_input
        last_call = (k - 1) * parts.call_input + denoiser.backward_peak(units)
    else:
        calls_held = k * denoiser.held(units)
        last_call = (k - 1) * denoiser.held(units) + denoiser.backward_peak(units)
    others = mode.checkpointing != ""  # the VAE decoder and reward tower checkpoint with --gradient-checkpointing
    # backward runs through the reward, then the decode, then the denoiser's calls, each freeing what it held
    peak = max(calls_held + parts.decode.held(others) + parts.reward.backward_peak(others),
               calls_held + parts.decode.backward_peak(others), last_call)
    # before the graph: the prompts are encoded and N - K no-grad calls sample the trajectory
    return max(peak, parts.encode_peak, parts.no_grad_call_peak)


def estimate(parts: StepParts, mode: Mode) -> Estimate:
    """Bytes per GPU. LoRA: the frozen denoiser in the weights' dtype, fp32 adapters, their gradients and Adam
    state, and the merged copy of the adapted weights that no-grad calls run on. Full fine-tune: fp32 weights,
    gradients and Adam state and a frozen base copy, each split over the GPUs with --fsdp, plus one block
    gathered whole at a time. Offloaded text encoders visit the GPU to encode, before the graph exists."""
    frozen_others = (parts.vae_parameters + parts.reward_parameters) * mode.weight_bytes
    text = parts.text_parameters * mode.weight_bytes
    activations = activation_bytes(parts, mode)
    if mode.offload_text:
        activations = max(activations, text)
        text = 0
    if mode.lora_rank is None:
        shard = parts.denoiser_parameters / mode.gpus
        gathered = 2 * parts.largest_block * mode.weight_bytes if mode.gpus > 1 else 0
        return Estimate(int(shard * FP32 + gathered), int(shard * FP32), int(shard * ADAM_STATE),
                        int(shard * mode.weight_bytes + text + frozen_others), activations)
    lora = parts.lora_per_rank * mode.lora_rank
    return Estimate(parts.denoiser_parameters * mode.weight_bytes + lora * FP32, lora * FP32, lora * ADAM_STATE,
                    parts.lora_targeted * mode.weight_bytes + text + frozen_others, activations)


def step_growth(parts: StepParts, mode: Mode) -> int:
    """What a warm LoRA step allocates above the loaded model and optimizer state: its activations and the
    gradients (the CPU's counterpart, bench.allocated_peak_growth_mb, measures this)."""
    return activation_bytes(parts, mode) + parts.lora_per_rank * mode.lora_rank * FP32


# ---------------------------------------------------------------------------------------------
# The tables


@dataclass
class MemoryConfig:
    # shipped models (configs/real); default all of them
    models: tuple[str, ...] = ("sd15", "sdxl", "sd35-medium", "sd35-large", "flux1-dev", "flux2-klein-4b",
                               "flux2-klein-9b")
    lora_ranks: tuple[int, ...] = ()  # LoRA ranks of the LoRA rows; default each family's (32; FLUX.1 64)
    gpus: tuple[int, ...] = (1, 8)  # --fsdp world sizes of the full fine-tune rows
    reward: str = "pickscore"  # reward network (configs/real/rewards)


def rows(cfg: MemoryConfig, model: str) -> list[str]:
    """One Markdown row per mode: LoRA and full fine-tuning, K = 1 and K = 10, checkpointed or not, text
    encoders offloaded or not, at the model's training resolution and per-GPU batch (bench.REAL_SHAPES)."""
    from bench import REAL_SHAPES

    import models

    resolution, batch = REAL_SHAPES[model]
    ranks = cfg.lora_ranks or (models.detect_family(shapes.model_folder(model)).defaults["lora_rank"],)
    # traced at the first rank: the LoRA layers' own activations (x A, r wide) are a small part of a call's
    parts = trace_step(model, cfg.reward, Mode(resolution, batch, ranks[0]))
    modes = []
    for rank in ranks:
        for offload in (False, True):
            modes += [(f"LoRA r={rank}", Mode(resolution, batch, rank, offload_text=offload, truncation=k,
                                              checkpointing=ckpt)) for k, ckpt in ((1, ""), (1, "steps"), (10, "steps"),
                                                                                   (10, "blocks"))]
    modes += [(f"full, --fsdp over {g}" if g > 1 else "full", Mode(resolution, batch, None, g, offload_text=True,
                                                                   checkpointing="blocks")) for g in cfg.gpus]
    lines = []
    for label, mode in modes:
        e = estimate(parts, mode)
        checkpointing = checkpointing_flags(mode)
        lines.append(f"| {model} | {resolution} px x {batch} | {label} | {mode.truncation} | {checkpointing} | "
                     f"{'yes' if mode.offload_text else 'no'} | {e.weights / GiB:.1f} | {e.gradients / GiB:.2f} | "
                     f"{e.optimizer / GiB:.2f} | {e.frozen / GiB:.1f} | {e.activations / GiB:.1f} | "
                     f"**{e.total / GiB:.1f}** |")
    return lines


def checkpointing_flags(mode: Mode) -> str:
    """The train.py flags of a mode: "steps" is the per-call checkpoint alone where K > 1, "blocks" nests the blocks."""
    if not mode.checkpointing:
        return "none"
    return "--gradient-checkpointing" + (" --checkpoint-calls-only" if mode.checkpointing == "steps" and mode.truncation > 1
                                         else "")


TABLE_HEADER = ["| model | image x batch per GPU | trained | K | checkpointing | text encoders offloaded | denoiser weights "
                "| gradients | Adam state | frozen | activations (or text encoders' visit) | total GiB |",
                "| --- | --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]


def main(cfg: MemoryConfig) -> None:
    import models

    models.quiet_loading()
    print("\n".join(TABLE_HEADER), flush=True)
    for model in cfg.models:
        print("\n".join(rows(cfg, model)), flush=True)


if __name__ == "__main__":
    main(tyro.cli(MemoryConfig, description=__doc__))

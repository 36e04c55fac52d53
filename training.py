"""DRaFT+ training: the config, the data order, one optimizer step, checkpoints and resume, and the
loop that train.py runs (bench.py builds its trainers from here too)."""

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import random
import shlex
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Literal

import torch
from tqdm import tqdm

import evaluation
import families
import generation
import models
import plots
import prompts as prompt_sets
import rewards
import utils
from generation import CompileOption, DeviceOption, RewardSourceOption, SamplerOptions, TextEncoderOptions
from utils import UsageError

# Below this loss scale an fp16 gradient overflows even unscaled: the scaler can no longer help.
LOSS_SCALE_FLOOR = 1.0


@dataclass(kw_only=True)
class TrainConfig(SamplerOptions, TextEncoderOptions, DeviceOption, RewardSourceOption, CompileOption):
    # a set of defaults: "demo" trains the bundled demo world on a CPU (see train.PRESETS); other flags still override it
    preset: Literal["none", "demo"] = "none"
    model: str = models.DEFAULT_MODEL  # diffusers pipeline: hub id or local folder
    reward: str = "pickscore"  # reward spec: a name, or weighted names such as pickscore:1.0,aesthetic:0.05
    prompts: str = "animals"  # bundled prompt set name, or a .txt/.json/.jsonl file
    truncation_steps: int = 1  # K: the last K sampler steps keep the graph (DRaFT-K); K = inference steps is full DRaFT
    truncation_range: tuple[int, int] | None = None  # LO HI: draw K per trajectory uniformly from [LO, HI], LO >= 1 (AlignProp)
    lv_samples: int = 0  # n > 0: DRaFT-LV, re-noise x_0 n times and denoise once with the graph
    kl_coeff: float = 0.1  # weight of the KL penalty: mean squared difference of tuned and base predictions
    log_kl: bool = False  # compute and log the KL even at --kl-coeff 0 (costs one base-model call per graph step)
    batch_size: int = 1  # prompts per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear learning-rate warm-up steps
    max_grad_norm: float = 1.0  # gradient clipping threshold (global L2 norm)
    # keep an exponential moving average of the trainable weights with this decay, e.g. 0.999 (off by default);
    # updated after each optimizer step, saved beside the raw weights (ema/), used for validation and by
    # --checkpoint consumers
    ema_decay: float | None = None
    steps: int = 1000  # optimizer steps in total
    lora_rank: int | None = None  # LoRA rank on the attention projections; default 32
    # LoRA alpha (scale = alpha / rank); default 32 (SD, SDXL), 64 (SD3 as FDFO and RTDMD, FLUX.2 [klein] as RTDMD)
    lora_alpha: float | None = None
    full_finetune: bool = False  # train every weight of the UNet or transformer instead of LoRA (a frozen copy is the KL base)
    # with --full-finetune: shard the denoiser, the frozen base, gradients and optimizer state over the processes
    # (FSDP2), with sharded checkpoints (torch.distributed.checkpoint) in a run dir all processes share
    fsdp: bool = False
    # with --fsdp: also write a consolidated unet/ (SD3: transformer/) folder every this many steps (0: the final one only)
    export_every: int = 0
    # autocast dtype of the denoiser's calls (text encoders, VAE and rewards run outside it); auto = bf16 on GPU, none on CPU
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    # recompute the UNet (SD3: transformer), VAE decoder and reward tower in backward to save memory: the
    # denoiser's blocks, and with K > 1 each graph call too (its blocks nested inside: one more forward per graph step)
    gradient_checkpointing: bool = False
    # recompute the denoiser's own blocks in backward (diffusers' enable_gradient_checkpointing) even without
    # --gradient-checkpointing
    checkpoint_blocks: bool = False
    # with --gradient-checkpointing at K > 1: recompute each graph call whole, without its blocks (about 5% faster,
    # but backward holds a whole call's activations: 15 GB more for SDXL at 1024 px, see docs/performance.md)
    checkpoint_calls_only: bool = False
    seed: int = 0  # seeds data order, noise and truncation draws; same results on any number of GPUs
    run_dir: str = "runs/draftp"  # where checkpoints, log.jsonl and validation grids go
    # refuse a run dir whose filesystem cannot lock it (NFS without a lock manager, Lustre without its flock
    # option) instead of training there unlocked after a warning
    require_run_dir_lock: bool = False
    save_every: int = 100  # checkpoint every this many steps (and at the end)
    val_every: int = 100  # base-vs-tuned grid of fixed prompts and seeds every this many steps (0: never)
    val_prompts: int = 4  # prompts in the validation grid
    # metrics of metrics.py (e.g. gold_fidelity clip_l14 hpsv2) to measure every --val-every steps (none at 0) on held-out
    # prompts and seeds, logged as val/<name> beside the training reward: reward hacking shows as it rising while they fall
    val_metrics: tuple[str, ...] = ()
    val_metrics_prompts: str = "eval_small"  # prompt set of --val-metrics (as metrics.py's --prompt-set)
    val_metrics_num_prompts: int = 8  # its prompts used, spread evenly over the set (as metrics.py's --num-prompts)
    val_metrics_repeats: int = 2  # images per prompt (as metrics.py's --num-repeats; diversity metrics need 2)
    val_metrics_seed: int = 0  # noise of the --val-metrics images (as metrics.py's --seed, whose default it is)
    log_every: int = 1  # print a status line every this many steps
    max_bad_steps: int = 5  # stop after this many bad steps in a row (non-finite loss, or fp16 loss scale below 1)
    wandb: bool = False  # also log to Weights & Biases
    # torch CPU threads of each process (0: torch's default, one per core); fewer keep a CPU run from
    # spinning against other busy processes on the same cores
    threads: int = 0
    wandb_project: str = "draftp"  # wandb project name


def validate(cfg: TrainConfig) -> None:
    """Everything that can be checked before loading or writing anything."""
    utils.require_at_least_one(steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                               lora_rank=cfg.lora_rank, save_every=cfg.save_every, log_every=cfg.log_every,
                               max_bad_steps=cfg.max_bad_steps, val_prompts=cfg.val_prompts)
    generation.validate_shared_options(cfg)
    for name in ("val_every", "warmup_steps", "lv_samples", "export_every", "threads"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"{utils.flag(name)} must be >= 0, got {getattr(cfg, name)}")
    low, high = cfg.truncation_range or (cfg.truncation_steps, cfg.truncation_steps)
    steps = cfg.inference_steps  # None until the family's default is filled in
    if not 0 <= low <= high or (steps is not None and high > steps):
        raise UsageError(f"truncation steps must satisfy 0 <= K <= --inference-steps ({cfg.inference_steps}), got {low}..{high}")
    if cfg.truncation_range and low < 1:
        raise UsageError(f"--truncation-range {low} {high}: a draw of K = 0 would train nothing; start at 1")
    if high == 0 and cfg.lv_samples == 0:
        raise UsageError("--truncation-steps 0 trains nothing: use K >= 1 or --lv-samples N")
    if cfg.lv_samples and cfg.truncation_range:
        raise UsageError("--lv-samples and --truncation-range exclude each other")
    for name in ("lr", "lora_alpha", "max_grad_norm"):
        if getattr(cfg, name) is not None and not getattr(cfg, name) > 0:
            raise UsageError(f"{utils.flag(name)} must be positive, got {getattr(cfg, name)}")
    if cfg.kl_coeff < 0 or cfg.weight_decay < 0:
        raise UsageError("--kl-coeff and --weight-decay must be >= 0")
    if cfg.fsdp and not cfg.full_finetune:
        raise UsageError("--fsdp shards full fine-tuning: add --full-finetune (LoRA gradients are a few MB, "
                         "one all-reduce serves them best)")
    if cfg.fsdp and cfg.truncation_range:
        # Sharded networks gather their weights in every call, so all processes must make the same calls;
        # K drawn per trajectory gives them different numbers of KL calls.
        raise UsageError("--fsdp and --truncation-range exclude each other: use a fixed --truncation-steps")
    if cfg.ema_decay is not None and not 0 <= cfg.ema_decay < 1:
        raise UsageError(f"--ema-decay must be in [0, 1), e.g. 0.999, got {cfg.ema_decay}")
    if cfg.fsdp and cfg.ema_decay is not None:
        raise UsageError("--ema-decay is not supported with --fsdp yet (the average would need sharding and "
                         "export of its own); train without it, or without --fsdp")
    if cfg.fsdp and cfg.compile:
        # FSDP2 gathers each block's weights in hooks around the block, which a compile of the whole network
        # would have to trace; that pairing is neither tested nor measured here.
        raise UsageError("--compile and --fsdp exclude each other for now: drop one of them")
    if cfg.fsdp and cfg.mixed_precision == "fp16":
        raise UsageError("--fsdp trains in bf16 or fp32 (--mixed-precision bf16, auto or no); fp16 is not supported")
    rewards.parse_reward_spec(cfg.reward)
    prompt_sets.load_prompts(cfg.prompts)
    if cfg.val_metrics and cfg.val_every:
        validate_val_metrics(cfg)
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise UsageError("--wandb needs the wandb package: pip install wandb (or train without --wandb)")


def validate_val_metrics(cfg: TrainConfig) -> None:
    names = evaluation.checked_metric_names(cfg.val_metrics, "--val-metrics")
    utils.require_at_least_one(val_metrics_num_prompts=cfg.val_metrics_num_prompts,
                               val_metrics_repeats=cfg.val_metrics_repeats)
    needs = max(evaluation.METRICS[name].min_repeats for name in names)
    if cfg.val_metrics_repeats < needs:
        raise UsageError(f"--val-metrics {' '.join(names)}: a diversity compares a prompt's images; use "
                         f"--val-metrics-repeats {needs} or more, got {cfg.val_metrics_repeats}")
    val_metrics_prompts(cfg)


def val_metrics_prompts(cfg: TrainConfig) -> dict[int, str]:
    """The held-out prompts of --val-metrics by their index in the set, chosen as metrics.py --num-prompts does."""
    every = prompt_sets.load_prompts(cfg.val_metrics_prompts)
    if cfg.val_metrics_num_prompts > len(every):
        raise UsageError(f"--val-metrics-num-prompts {cfg.val_metrics_num_prompts} exceeds the {len(every)} prompts "
                         f"of {cfg.val_metrics_prompts!r}")
    return {p: every[p] for p in prompt_sets.spread_indices(len(every), cfg.val_metrics_num_prompts)}


def resolved(cfg: TrainConfig, family: families.Family) -> TrainConfig:
    """`cfg` with its family's defaults for the flags left unset (SD3 trains at 512 px, as FDFO and
    RTDMD do; SD and SDXL at their model's own size), validated again with them."""
    cfg = generation.with_family_defaults(cfg, family)
    if cfg.resolution is None:
        cfg = replace(cfg, resolution=family.train_resolution)
    validate(cfg)
    return cfg


def most_graph_calls(cfg: TrainConfig) -> int:
    """The most denoiser calls with a graph in one rollout: K at most (DRaFT-LV: one, on n copies)."""
    if cfg.lv_samples:
        return 1
    return cfg.truncation_range[1] if cfg.truncation_range else cfg.truncation_steps


@dataclass(frozen=True)
class DenoiserCheckpointing:
    per_call: bool  # torch.utils.checkpoint around each graph call: memory flat in K
    blocks: bool  # the denoiser's own blocks (diffusers' enable_gradient_checkpointing)


def denoiser_checkpointing(cfg: TrainConfig) -> DenoiserCheckpointing:
    """How --gradient-checkpointing, --checkpoint-blocks and --checkpoint-calls-only recompute the denoiser in backward.

    With one graph call per rollout (K = 1, DRaFT-LV), checkpointing the blocks alone holds less than the
    per-call checkpoint (the blocks' inputs and one block's activations, not the whole call's) for the
    same single recomputation, so --gradient-checkpointing takes it. With more, the per-call checkpoint keeps
    memory flat in K where the blocks' inputs would pile up call by call, and the blocks are checkpointed inside
    it: otherwise backward recomputes a whole call's activations at once, which at the real shapes is most of
    the step's memory (memory.py: SDXL at 1024 px, K = 10, 25.7 GB against 17.6 GB; SD3.5 Large 69.9 against
    38.3) for one more forward per graph step (about 5% of the step). --checkpoint-calls-only leaves the blocks out."""
    single_call = most_graph_calls(cfg) <= 1
    nested_blocks = cfg.gradient_checkpointing and (single_call or not cfg.checkpoint_calls_only)
    return DenoiserCheckpointing(per_call=cfg.gradient_checkpointing and not single_call,
                                 blocks=cfg.checkpoint_blocks or nested_blocks)


def memory_warning(cfg: TrainConfig) -> str | None:
    """K > 1 without checkpointing keeps a whole network call's activations per graph step: say so."""
    highest = most_graph_calls(cfg)
    if highest <= 1 or cfg.gradient_checkpointing:
        return None
    return (f"warning: K up to {highest} without --gradient-checkpointing keeps {highest} UNet calls' activations "
            "for backward, so memory grows with K; --gradient-checkpointing keeps it flat in K")


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    choice = cfg.mixed_precision
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "no"
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


# ---------------------------------------------------------------------------------------------
# Data: global sample positions map to prompts and noise seeds independently of the world size


class PromptStream:
    """Sample position p of the whole run -> (prompt, noise seed). Epochs are reshuffled by seed."""

    def __init__(self, prompts: list[str], seed: int):
        self.prompts = prompts
        self.seed = seed
        self._epoch, self._order = -1, []

    def prompt(self, position: int) -> str:
        epoch, index = divmod(position, len(self.prompts))
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(utils.derive_seed(self.seed, epoch))
            self._epoch, self._order = epoch, torch.randperm(len(self.prompts), generator=generator).tolist()
        return self.prompts[self._order[index]]

    def noise_seed(self, position: int) -> int:
        return utils.derive_seed(self.seed, 1, position)


def global_batch(cfg: TrainConfig, world_size: int) -> int:
    return cfg.batch_size * cfg.grad_accum * world_size


def micro_batch_positions(cfg: TrainConfig, step: int, micro: int, dist: utils.Dist) -> range:
    """The global positions of this rank's micro-batch: a 1-GPU run with grad accumulation covers
    the same positions, in the same micro-batches, as a multi-GPU run with the same global batch."""
    start = step * global_batch(cfg, dist.world_size) + (micro * dist.world_size + dist.rank) * cfg.batch_size
    return range(start, start + cfg.batch_size)


def truncation_for(cfg: TrainConfig, first_position: int) -> int:
    if cfg.truncation_range is None:
        return 0 if cfg.lv_samples else cfg.truncation_steps
    chunk = first_position // cfg.batch_size
    return random.Random(utils.derive_seed(cfg.seed, 2, chunk)).randint(*cfg.truncation_range)


# ---------------------------------------------------------------------------------------------
# One training step


@dataclass
class Trainer:
    cfg: TrainConfig
    dist: utils.Dist
    model: models.DiffusionModel
    reward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    stream: PromptStream
    sharded: bool = False  # the UNet and its base copy are FSDP-sharded over the processes
    # --ema-decay: the moving average of the trainable weights, one fp32 tensor per parameter, in their order
    ema: list[torch.Tensor] | None = None
    val_scorers: dict = field(default_factory=dict)  # --val-metrics by name, on the processes that measure them

    @property
    def validates(self) -> bool:
        """Whether this process makes the validation calls: rank 0, or every rank when the networks are
        sharded (each call then needs them all)."""
        return self.dist.is_main or self.sharded

    @property
    def computes_kl(self) -> bool:
        return self.cfg.kl_coeff > 0 or self.cfg.log_kl

    def rollout(self, prompts: list[str], seeds: list[int], truncation: int, lv_samples: int = 0, base_only=False):
        """Sample with the graph on the last `truncation` steps; return images and the KL (None unless
        it is asked for: the base model's call would cost for nothing)."""
        cfg = self.cfg
        settings = generation.SamplerSettings.of(cfg, self.resolution)
        # Latents stay fp32, and only the denoiser's calls are autocast (model.autocast): the scheduler
        # arithmetic is that of fp32 sampling.
        return generation.generate(self.model, prompts, seeds, settings, truncation_steps=truncation,
                                   with_kl=self.computes_kl and not base_only, base_only=base_only,
                                   lv_samples=lv_samples, checkpoint_denoiser=denoiser_checkpointing(cfg).per_call)

    @property
    def resolution(self) -> int:
        return self.cfg.resolution or self.model.default_resolution()

    def step(self, step: int) -> dict:
        """Accumulate gradients over the micro-batches, average over ranks, clip, update."""
        cfg = self.cfg
        self.set_lr(step)
        scores, kls, losses, truncations = [], [], [], []
        # Sharded, every micro-batch's backward reduce-scatters its gradients into the shards (FSDP2's default):
        # one reduce-scatter per micro-batch instead of one per step, for 1/world of the gradient memory; without
        # sync until the last one, each process would hold the whole unsharded fp32 gradient in between.
        for micro in range(cfg.grad_accum):
            positions = micro_batch_positions(cfg, step, micro, self.dist)
            batch_prompts = [self.stream.prompt(p) for p in positions]
            seeds = [self.stream.noise_seed(p) for p in positions]
            truncation = truncation_for(cfg, positions[0])
            images, kl = self.rollout(batch_prompts, seeds, truncation, cfg.lv_samples)
            score = self.reward(images, batch_prompts * max(1, cfg.lv_samples))
            loss = -score.float().mean()
            if cfg.kl_coeff > 0:
                loss = loss + cfg.kl_coeff * kl.float()
            self.scaler.scale(loss / cfg.grad_accum).backward()
            scores.append(score.detach().float())
            kls.append(kl.detach().float() if kl is not None else torch.zeros((), device=self.dist.device))
            losses.append(loss.detach())
            truncations.append(truncation)

        # On the run's device: NCCL serves CUDA tensors only.
        summary = torch.stack([torch.stack(losses).mean(), torch.stack(kls).mean()]).to(self.dist.device)
        params = models.trainable_parameters(self.model)
        # FSDP has averaged the sharded gradients in backward already
        gradients = [] if self.sharded else [p.grad for p in params if p.grad is not None]
        utils.all_reduce_mean_(gradients + [summary])
        loss_value, kl_value = summary.tolist()
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.unscale_(self.optimizer)
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        # With fp16 an overflowing gradient is the scaler calibrating: it skips that update and halves
        # its scale. Without a scaler, a non-finite gradient has no such reading.
        applied = math.isfinite(loss_value) and math.isfinite(grad_norm)
        if applied:
            self.scaler.step(self.optimizer)
            self.model.lora_changed()
            if self.ema is not None:
                update_ema(self.ema, params, self.cfg.ema_decay)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        bad = not math.isfinite(loss_value) or (not applied and (scale is None or scale < LOSS_SCALE_FLOOR))

        all_scores = torch.cat([torch.cat(s) for s in utils.gather_objects([s.cpu() for s in scores])])
        record = {
            "loss": loss_value,
            "reward_mean": all_scores.mean().item(),
            "reward_std": all_scores.std().item() if all_scores.numel() > 1 else 0.0,
            "kl": kl_value if self.computes_kl else None,
            "grad_norm": grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "truncation_steps": sum(truncations) / len(truncations),
            "skipped": not applied,
            "bad": bad,
        }
        if scale is not None:
            record["loss_scale"] = scale
        return record

    def set_lr(self, step: int) -> None:
        scale = min(1.0, (step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * scale

    @contextlib.contextmanager
    def ema_weights(self):
        """The model holds the EMA weights inside, its raw ones again after, bit for bit: each parameter
        trades tensors with its average, so nothing is copied (and `self.ema` holds the raw ones meanwhile)."""
        self._swap_ema()
        try:
            yield
        finally:
            self._swap_ema()

    def _swap_ema(self) -> None:
        for index, param in enumerate(models.trainable_parameters(self.model)):
            param.data, self.ema[index] = self.ema[index], param.data
        self.model.lora_changed()

    def validation_weights(self):
        """The weights validation shows (the grid, --val-metrics): the EMA when there is one."""
        return self.ema_weights() if self.ema is not None else contextlib.nullcontext()

    @torch.no_grad()
    def validation_grid(self, step: int, val_prompts: list[str]):
        """Base and tuned side by side on the same noise, each captioned with its reward; rank 0 writes it."""
        seeds = [utils.derive_seed(self.cfg.seed, 3, i) for i in range(len(val_prompts))]
        base_images, _ = self.rollout(val_prompts, seeds, 0, base_only=True)
        with self.validation_weights():
            tuned_images, _ = self.rollout(val_prompts, seeds, 0)
        base_scores = self.reward(base_images, val_prompts).float()
        tuned_scores = self.reward(tuned_images, val_prompts).float()
        rows = [list(pair) for pair in zip(utils.to_pil(base_images), utils.to_pil(tuned_images))]
        captions = [[f"base {b:.3g}\n{prompt}", f"tuned {t:.3g}"]
                    for prompt, b, t in zip(val_prompts, base_scores.tolist(), tuned_scores.tolist())]
        if self.dist.is_main:
            grid = utils.image_grid(rows, captions, header=["base", f"step {step}"])
            path = validation_grid_path(self.cfg.run_dir, step)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            utils.write_atomic_file(path, lambda tmp: grid.save(tmp, format="PNG"))
        return {"val_reward_base": base_scores.mean().item(), "val_reward_tuned": tuned_scores.mean().item()}

    @torch.no_grad()
    def validation_metrics(self) -> dict:
        """--val-metrics of the tuned model, on the images metrics.py would draw for the same prompts, seeds
        and sampler settings, and reduced as it reduces them: {"val/<name>": mean over prompts}."""
        cfg = self.cfg
        prompts = val_metrics_prompts(cfg)
        image_set = evaluation.ImageSet("draft", prompts, dict.fromkeys(prompts, cfg.val_metrics_repeats))
        settings = generation.SamplerSettings.of(cfg, self.resolution)

        def images_of(one_set, batch):
            return evaluation.rendered_as_saved(self.model, one_set, batch, settings, cfg.val_metrics_seed)

        alone = utils.Dist(0, 1, 0, self.dist.device)  # each validating process measures every prompt
        with self.validation_weights():
            records = evaluation.score_share([image_set], self.val_scorers, images_of, cfg.batch_size, alone,
                                             show_bar=False)
        results = evaluation.summarize([image_set], list(self.val_scorers), records)["draft"]["metrics"]
        return {f"val/{name}": summary["mean"] for name, summary in results.items()}


def new_ema(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The average before any step: the weights themselves (fp32, as the trainable weights are)."""
    return [param.detach().float().clone() for param in params]


def update_ema(ema: list[torch.Tensor], params: list[torch.nn.Parameter], decay: float) -> None:
    """ema = decay * ema + (1 - decay) * param, for each pair, in place."""
    torch.optim.swa_utils.get_ema_multi_avg_fn(decay)(ema, [param.detach() for param in params], None)


def full_value(norm: torch.Tensor) -> float:
    """The global gradient norm; with sharded parameters it is a DTensor whose value every rank holds."""
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


# ---------------------------------------------------------------------------------------------
# Sharding (FSDP2)


def sharding(amp: torch.dtype | None):
    """FSDP2's fully_shard of one module, computing in `amp` (None: the weights' own dtype) and reducing
    gradients in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32)
    return lambda module: fully_shard(module, mp_policy=policy)


def shard(model: models.DiffusionModel, shard_one) -> None:
    """Shard the trainable denoiser per block (its family's shard_units), so a process holds 1/world of its
    weights (and of the gradients and optimizer state) and gathers one block's at a time. Its frozen base is
    sharded as it is made (models.frozen_copy)."""
    for unit in model.family.shard_units(model.denoiser):
        shard_one(unit)
    shard_one(model.denoiser)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def run_record(cfg: TrainConfig, world_size: int) -> dict:
    """What a run dir's config.json holds: the resolved config and the world size it ran on."""
    return {**asdict(cfg), "world_size": world_size}


# What a model card lists of a run's settings, in this order.
CARD_SETTINGS = ("reward", "prompts", "truncation_steps", "truncation_range", "lv_samples", "kl_coeff",
                 "inference_steps", "guidance_scale", "scheduler", "eta", "resolution", "batch_size", "grad_accum",
                 "lr", "steps", "lora_rank", "lora_alpha", "full_finetune", "ema_decay", "seed")


def training_command(world_size: int) -> str:
    launcher = f"torchrun --nproc_per_node={world_size} train.py" if world_size > 1 else "python train.py"
    return " ".join([launcher, *map(shlex.quote, sys.argv[1:])])


def model_card(cfg: TrainConfig, world_size: int, step: int, metrics: dict, ema: bool = False):
    """The Hub's model card of a checkpoint folder, in the format of diffusers' own training scripts:
    the YAML metadata of `load_or_create_model_card(from_training=True)` from diffusers' template, and
    their tags through `populate_model_card`. The template is filled in directly rather than through
    load_or_create_model_card, which first looks the card up on the Hub by repo id: a local folder has
    none, offline it cannot look, and online a repo of the same name would lend us its card."""
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    base_model = None if os.path.isdir(cfg.model) else cfg.model  # a local folder is no Hub id
    kind = "full fine-tune" if cfg.full_finetune else "LoRA"
    usage = ("pipe.load_lora_weights(\"PATH_OR_HUB_ID_OF_THIS_FOLDER\")"
             if not cfg.full_finetune else "# load the tuned denoiser folder of this checkpoint into the pipeline")
    settings = "\n".join(f"| `{utils.flag(name)}` | `{getattr(cfg, name)}` |" for name in CARD_SETTINGS)
    logged = "\n".join(f"| `{name}` | {value:.6g} |" for name, value in metrics.items()
                        if isinstance(value, (int, float)) and not isinstance(value, bool))
    description = f"""# DRaFT+ {kind} of {cfg.model}, step {step}{" (exponential moving average)" if ema else ""}

Reward fine-tuning by back-propagation through the last {cfg.truncation_steps} sampler step(s) with a KL
penalty to the base model (DRaFT+), against the reward `{cfg.reward}`, trained with draftp:

```
{training_command(world_size)}
```

| setting | value |
| --- | --- |
{settings}
| processes | `{world_size}` |

Logged at step {step} (`log.jsonl` of the run has every step):

| metric | value |
| --- | --- |
{logged}

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{cfg.model}")
{usage}
```"""
    card = ModelCard.from_template(
        card_data=ModelCardData(library_name="diffusers", base_model=base_model, inference=True),
        template_path=MODEL_CARD_TEMPLATE_PATH, model_description=description)
    tags = ["text-to-image", "diffusers", "diffusers-training", "lora" if not cfg.full_finetune else "full-finetune",
            "draft", "reward-fine-tuning", *(name.split(":")[0] for name in cfg.reward.split(","))]
    return populate_model_card(card, tags=tags)


def save_checkpoint(trainer: Trainer, step: int, export: bool, metrics: dict | None = None) -> str:
    """Write the tuned weights, optimizer, RNG and data position, and the config, atomically: into a
    temporary folder renamed into place, so a killed save leaves nothing a resume would read.

    Unsharded, rank 0 writes everything, once every rank's weight fingerprint agrees with the others:
    a mismatch means the replicas drifted apart (model folders that differ between nodes,
    non-deterministic kernels, a missed all-reduce), and ends the run instead of saving rank 0's
    weights as if they were everyone's. With --fsdp every rank writes its shards (`export`: rank 0
    also a consolidated unet/)."""
    cfg = trainer.cfg
    fingerprints = None if cfg.fsdp else utils.gather_objects(weights_fingerprint(trainer.model))
    if fingerprints is not None and (odd := disagreeing_ranks(fingerprints)):
        raise ReplicasDisagree(f"the replicas' weights disagree at step {step}: rank {', '.join(map(str, odd))} "
                               f"{'holds' if len(odd) == 1 else 'hold'} other weights than the rest of the "
                               f"{len(fingerprints)} processes; checkpoint not saved")
    folder = utils.checkpoint_dir(cfg.run_dir, step)
    tmp = os.path.join(os.path.dirname(folder), ".tmp-" + os.path.basename(folder))  # the same name on every rank
    if trainer.dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    utils.barrier()
    if cfg.fsdp:
        save_sharded(trainer, tmp, export)
    elif trainer.dist.is_main:
        models.save_tuned(trainer.model, tmp)
        if trainer.ema is not None:  # in the same formats, so stock loaders read it as they read the raw ones
            with trainer.ema_weights():
                models.save_tuned(trainer.model, os.path.join(tmp, models.EMA_DIR))
            model_card(cfg, trainer.dist.world_size, step, metrics or {}, ema=True).save(
                os.path.join(tmp, models.EMA_DIR, "README.md"))
    if trainer.dist.is_main:
        optimizer = {} if cfg.fsdp else {"optimizer": trainer.optimizer.state_dict()}
        torch.save({**optimizer, "scaler": trainer.scaler.state_dict(), "rng": torch.get_rng_state()},
                   os.path.join(tmp, "trainer_state.pt"))
        utils.save_json(os.path.join(tmp, "state.json"), {"step": step, "rank_fingerprints": fingerprints})
        utils.save_json(os.path.join(tmp, "config.json"), run_record(cfg, trainer.dist.world_size))
        model_card(cfg, trainer.dist.world_size, step, metrics or {}).save(os.path.join(tmp, "README.md"))
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    utils.barrier()
    return folder


class ReplicasDisagree(Exception):
    pass


def disagreeing_ranks(fingerprints: list[str]) -> list[int]:
    """The ranks whose weights differ from those most ranks hold (on a tie, from rank 0's)."""
    counts = {fingerprint: fingerprints.count(fingerprint) for fingerprint in fingerprints}
    reference = max(counts, key=lambda fingerprint: (counts[fingerprint], fingerprint == fingerprints[0]))
    return [rank for rank, fingerprint in enumerate(fingerprints) if fingerprint != reference]


def weights_fingerprint(model: models.DiffusionModel) -> str:
    """A hash of the exact bytes of the trainable weights."""
    digest = hashlib.sha256()
    for param in models.trainable_parameters(model):
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def save_sharded(trainer: Trainer, folder: str, export: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    from torch.distributed.fsdp import FSDPModule

    unet = trainer.model.unet
    model_state, optimizer_state = get_state_dict(unet, trainer.optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.save(state, checkpoint_id=os.path.join(folder, models.SHARDED_DIR))
    if not export:
        return
    # A collective: every rank sends its shards, rank 0 receives the whole UNet on the CPU.
    full = get_model_state_dict(unet, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.dist.is_main:
        unet_dir = os.path.join(folder, trainer.model.denoiser_name)  # unet/ or transformer/, as save_tuned
        os.makedirs(unet_dir)
        # The config names the model's own class, not FSDP's wrapper of it, so that stock loaders read it.
        config = json.loads(unet.to_json_string())
        config["_class_name"] = next(c for c in type(unet).__mro__ if not issubclass(c, FSDPModule)).__name__
        utils.save_json(os.path.join(unet_dir, "config.json"), config)
        save_file({name: tensor.contiguous() for name, tensor in full.items()},
                  os.path.join(unet_dir, "diffusion_pytorch_model.safetensors"))


def restore_sharded(trainer: Trainer, folder: str) -> None:
    """The sharded UNet and optimizer, resharded by torch.distributed.checkpoint onto any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    unet = trainer.model.unet
    model_state, optimizer_state = get_state_dict(unet, trainer.optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=os.path.join(folder, models.SHARDED_DIR))
    set_state_dict(unet, trainer.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def resume(trainer: Trainer) -> tuple[int, str | None]:
    """The step to start from and the checkpoint it comes from (0, None for a fresh run): rank 0 looks
    for the run dir's latest complete checkpoint, and every rank follows it."""
    latest = utils.broadcast_from_main(lambda: utils.latest_checkpoint(trainer.cfg.run_dir))
    if latest is None:
        return 0, None
    return restore_checkpoint(trainer, latest), latest


def restore_checkpoint(trainer: Trainer, folder: str) -> int:
    """Load weights, optimizer, RNG and position into every rank's trainer; a damaged checkpoint ends in
    one line. Rank 0 alone reads the files and sends every rank what it read, so that ranks on nodes
    that share no filesystem resume exactly as on a shared run dir; with --fsdp each rank reads its own
    shards, from the run dir that all of them see (checked at start)."""
    state = utils.broadcast_from_main(lambda: read_checkpoint(trainer, folder), trainer.dist.device)
    if trainer.cfg.fsdp:
        with reported_as_damage(folder):
            restore_sharded(trainer, folder)
    else:
        with torch.no_grad():
            for param, weight in zip(models.trainable_parameters(trainer.model), state["weights"]):
                param.copy_(weight)
            for average, weight in zip(trainer.ema or [], state["ema"]):
                average.copy_(weight)
        trainer.model.lora_changed()
        trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"].cpu())
    return state["step"]


def read_checkpoint(trainer: Trainer, folder: str) -> dict:
    """What every rank restores from `folder`, read on one: the step, scaler and RNG, and unsharded the
    trainable weights, their EMA and the optimizer state (read into this rank's trainer, through the
    loaders of their on-disk formats)."""
    with reported_as_damage(folder):
        state = torch.load(os.path.join(folder, "trainer_state.pt"), map_location="cpu", weights_only=True)
        with open(os.path.join(folder, "state.json")) as f:
            restored = {"step": json.load(f)["step"], "scaler": state["scaler"], "rng": state["rng"]}
        if trainer.cfg.fsdp:
            return restored
        models.load_tuned_into_training(trainer.model, folder)
        if trainer.ema is not None:  # loaded into the parameters while they hold the average: fp32, exact
            with trainer.ema_weights():
                models.load_tuned_into_training(trainer.model, os.path.join(folder, models.EMA_DIR))
        trainer.optimizer.load_state_dict(state["optimizer"])
    return {**restored, "weights": [param.detach() for param in models.trainable_parameters(trainer.model)],
            "ema": trainer.ema or [], "optimizer": trainer.optimizer.state_dict()}


@contextlib.contextmanager
def reported_as_damage(folder: str):
    try:
        yield
    except UsageError:
        raise
    except Exception as error:  # any damage: truncated file, wrong format, missing key
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot resume from {folder!r} ({text}); move it away to resume from an earlier one") from None


# Flags whose default depends on the model family: None until the family is read from the model folder.
FAMILY_DEFAULTED = (*dict.fromkeys(flag for family in families.FAMILIES for flag in family.defaults), "resolution")
# Fields a resume may change: they shape neither the weights nor the data order.
MUTABLE_ON_RESUME = {"steps", "save_every", "val_every", "log_every", "wandb", "wandb_project", "device", "threads",
                     "offload_text_encoders", "export_every", "run_dir",  # a run dir may be moved or copied
                     "require_run_dir_lock",
                     "val_metrics", "val_metrics_prompts", "val_metrics_num_prompts", "val_metrics_repeats",
                     "val_metrics_seed", "compile"}


def recorded_run(run_dir: str) -> dict | None:
    """The config.json of the run dir, as rank 0 reads it and every rank receives it (nodes may share no
    filesystem: the run dir of another node may be empty, or another run's)."""

    def read() -> dict | None:
        path = os.path.join(run_dir, "config.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    return utils.broadcast_from_main(read)


def check_same_run(cfg: TrainConfig, world_size: int) -> TrainConfig:
    """A run dir belongs to one configuration; only --steps (and logging cadence) may change on resume.
    On another number of processes the global batch is kept, by --grad-accum, or the resume is refused.
    Runs before anything is loaded, so a mismatch costs no minutes of loading. Every rank decides from
    rank 0's record, so all follow the same configuration."""
    previous = recorded_run(cfg.run_dir)
    if previous is None:
        return cfg
    previous_world = previous.get("world_size", world_size)
    free = MUTABLE_ON_RESUME
    if world_size != previous_world:
        cfg = keep_global_batch(cfg, previous, previous_world, world_size)
        free = free | {"grad_accum"}
    # Left to the family, a flag takes what the run recorded: the same model (compared below) has the same
    # defaults, and the check comes before the model is looked at, so that it is the one reported.
    cfg = replace(cfg, **{key: previous[key] for key in FAMILY_DEFAULTED if getattr(cfg, key) is None and key in previous})
    # A flag newer than the run dir's config.json had its default in that run.
    defaults = {f.name: f.default for f in fields(cfg)}
    for key, value in asdict(cfg).items():
        old = json.loads(json.dumps(previous.get(key, defaults[key])))
        if key not in free and json.loads(json.dumps(value)) != old:
            raise UsageError(
                f"--run-dir {cfg.run_dir!r} holds a run with {key}={old!r}, not {value!r}; use another --run-dir"
            )
    return cfg


def keep_global_batch(cfg: TrainConfig, previous: dict, previous_world: int, world_size: int) -> TrainConfig:
    batch = previous["batch_size"] * previous["grad_accum"] * previous_world
    per_micro_batch = cfg.batch_size * world_size
    if batch % per_micro_batch:
        raise UsageError(f"--run-dir {cfg.run_dir!r} ran on {previous_world} processes with a global batch of "
                         f"{batch}, which {world_size} processes x --batch-size {cfg.batch_size} cannot divide; "
                         f"resume on {previous_world} processes or use another --run-dir")
    grad_accum = batch // per_micro_batch
    if grad_accum != cfg.grad_accum:
        utils.print0(f"resuming a {previous_world}-process run on {world_size}: --grad-accum {grad_accum} "
                     f"keeps its global batch of {batch}{resume_memory_note(cfg, previous_world, world_size)}")
    return replace(cfg, grad_accum=grad_accum)


def resume_memory_note(cfg: TrainConfig, previous_world: int, world_size: int) -> str:
    """What another number of processes does to each one's memory: accumulating gradients over more
    micro-batches costs time, not memory (they add into the same buffers; sharded ones stay sharded),
    but with --fsdp each process holds another share of the weights, gradients and optimizer state."""
    if not cfg.fsdp:
        return " (more micro-batches per step take more time, not more memory)"
    return (f" (gradients stay sharded across micro-batches; each process now holds 1/{world_size} of the "
            f"weights, gradients and Adam state instead of 1/{previous_world}: x{previous_world / world_size:.3g} "
            "their memory per process)")


# ---------------------------------------------------------------------------------------------


def build(cfg: TrainConfig, dist: utils.Dist, load_model=models.load_model, load_reward=rewards.load_reward) -> Trainer:
    """`load_model` and `load_reward` (same arguments as the defaults) replace the loaders where the networks
    come from elsewhere: bench.py's real shapes build them from their configs with random weights."""
    cfg = resolved(cfg, models.detect_family(cfg.model))
    amp = autocast_dtype(cfg, dist.device)
    weights_dtype = amp or torch.float32  # of everything frozen; trainable weights are fp32
    # What stays frozen loads in the training dtype; a full fine-tune's denoiser in fp32, whose frozen copy
    # is then made in the training dtype (sharded unit by unit with --fsdp). With --fsdp the denoiser stays on
    # the CPU: fully_shard moves each unit to the device as it shards it, so that no GPU holds the whole fp32
    # denoiser (diffusers loads it on the CPU anyway, before moving it).
    sharded = cfg.fsdp and dist.world_size > 1
    model = load_model(cfg.model, dist.device, weights_dtype, cfg.scheduler, generation.text_encoding(cfg),
                       denoiser_dtype=torch.float32 if cfg.full_finetune else None,
                       denoiser_device=torch.device("cpu") if sharded else None)
    generation.checked_resolution(model, cfg.resolution)
    model.autocast = amp
    if cfg.full_finetune:
        units, shard_base = (model.family.shard_units(model.denoiser), sharding(None)) if sharded else ((), None)
        models.enable_full_finetune(model, weights_dtype, units, shard_base)
    else:
        models.attach_lora(model, cfg.lora_rank, cfg.lora_alpha)
    if cfg.gradient_checkpointing:
        model.pipe.vae.enable_gradient_checkpointing()
    if denoiser_checkpointing(cfg).blocks:
        model.denoiser.enable_gradient_checkpointing()
    if cfg.compile:
        models.compile_denoisers(model)
    if sharded:
        shard(model, sharding(amp))
    # Rewards run outside autocast in their own dtype: bf16 has fp32's range, fp16 would overflow in their towers.
    reward_dtype = torch.bfloat16 if amp == torch.bfloat16 else torch.float32
    reward = load_reward(cfg.reward, rewards.parse_reward_sources(cfg.reward_source), dtype=reward_dtype,
                         device=dist.device, gradient_checkpointing=cfg.gradient_checkpointing)
    params = models.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp == torch.float16)
    stream = PromptStream(prompt_sets.load_prompts(cfg.prompts), cfg.seed)
    ema = new_ema(params) if cfg.ema_decay is not None else None
    trainer = Trainer(cfg, dist, model, reward, optimizer, scaler, stream, sharded, ema)
    if cfg.val_metrics and cfg.val_every and trainer.validates:
        setup = evaluation.MetricSetup(dist.device, rewards.parse_reward_sources(cfg.reward_source),
                                       dreamsim_cache="~/.cache/dreamsim")
        names = evaluation.checked_metric_names(cfg.val_metrics)
        trainer.val_scorers = evaluation.load_metrics(names, setup, dist if sharded else utils.Dist(0, 1, 0, dist.device))
    return trainer


WANDB_RUN = "wandb-run.json"  # in the run dir: the id of its wandb run, so that a resume continues that run


def start_wandb(cfg: TrainConfig, start: int):
    """A wandb run of its own per run dir, its id kept in the run dir (which may move). A resume rewinds
    that run to the checkpoint's step (wandb's `resume_from`), so the steps run again replace those logged
    after it, as in log.jsonl; a start from step 0 begins a new run."""
    import wandb

    path = os.path.join(cfg.run_dir, WANDB_RUN)
    common = dict(project=cfg.wandb_project, config=asdict(cfg), dir=cfg.run_dir)
    if start > 0 and os.path.exists(path):
        with open(path) as f:
            run_id = json.load(f)["id"]
        return wandb.init(resume_from=f"{run_id}?_step={start}", **common)
    run = wandb.init(**common)
    utils.save_json(path, {"id": run.id, "project": cfg.wandb_project})
    return run


def log_to_wandb(run, record: dict, step: int, images: dict[str, str]) -> None:
    """One history row per step: its scalars and the images (name -> PNG path) drawn at it."""
    import wandb

    run.log({**record, **{name: wandb.Image(path) for name, path in images.items()}}, step=step)


def status_line(step: int, total: int, record: dict) -> str:
    kl = "" if record["kl"] is None else f" kl {record['kl']:.3e}"
    return (f"step {step}/{total} loss {record['loss']:.4f} reward {record['reward_mean']:.4f}"
            f"±{record['reward_std']:.3f}{kl} |g| {record['grad_norm']:.3f} "
            f"{record['sec_per_step']:.2f}s/step {record['images_per_s']:.2f} img/s")


class Diverged(Exception):
    pass


def spread(items: list, count: int) -> list:
    """`count` items evenly spread over the list (a sorted prompt set's head would be all alike)."""
    return [items[i] for i in prompt_sets.spread_indices(len(items), min(count, len(items)))]


CURVES = (("reward_mean", "training reward"), ("kl", "KL"), ("grad_norm", "gradient norm"))


def curves_figure(records: list[dict]):
    """The training reward, KL and gradient norm against step, each a noisy per-step value drawn faint under
    its moving average; and each val/<name>, measured every --val-every steps, as markers. One panel each."""
    panels = []
    for key, title in CURVES:
        points = [plots.Point(r["step"], r[key]) for r in records if r.get(key) is not None]
        series = plots.Series(title, points, smoothing=plots.smoothing_weight(len(points)))
        panels.append(plots.Panel([series], "step", key, title))
    for key in dict.fromkeys(k for r in records for k in r if k.startswith("val/")):
        points = [plots.Point(r["step"], r[key]) for r in records if r.get(key) is not None]
        panels.append(plots.Panel([plots.Series("", points, joined=True, labelled=False)], "step", key, key))
    return plots.figure(panels, columns=3, panel_size=(480, 320))


def latest_metrics(records: list[dict]) -> dict:
    """Each logged metric's latest value (validation metrics are logged only every --val-every steps)."""
    latest = {}
    for record in records:
        latest.update({key: value for key, value in record.items() if value is not None and key not in ("step", "bad")})
    return latest


def validation_grid_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "val", f"step-{step:07d}.png")


def write_curves(records: list[dict], path: str) -> None:
    plots.save_png(curves_figure(records), path)


def baseline_val_metrics(trainer: Trainer, log: utils.JsonlLog, run) -> None:
    """--val-metrics of the model before its first step (the base model), logged as step 0, so that the
    curves show where each metric started from."""
    record = {"step": 0, **(trainer.validation_metrics() if trainer.validates else {})}
    if trainer.dist.is_main:
        log.write(record)
        if run is not None:
            run.log(record, step=0)
    utils.barrier()


def run_steps(trainer: Trainer, start: int, log: utils.JsonlLog, run, val_prompts: list[str]) -> str | None:
    """Steps `start` .. cfg.steps with logging, validation grids and checkpoints; raises Diverged and
    ReplicasDisagree. Returns the last checkpoint written."""
    cfg, dist = trainer.cfg, trainer.dist
    bad_streak, saved = 0, None
    memory = utils.MemoryMeter(dist.device)
    if start == 0 and cfg.val_metrics and cfg.val_every:
        baseline_val_metrics(trainer, log, run)
    # closed however the loop ends, so that a stop's one line is the last on the terminal
    with tqdm(total=cfg.steps, initial=start, disable=not dist.is_main, desc="train", dynamic_ncols=True) as bar:
        for step in range(start, cfg.steps):
            done = step + 1
            timer = utils.Timer()
            memory.reset_peak()
            record = trainer.step(step)
            seconds = timer.seconds()
            record.update(step=done, sec_per_step=seconds, images_per_s=global_batch(cfg, dist.world_size) / seconds,
                          peak_mem_mb=memory.peak_mb(), mem_growth_mb=memory.growth_mb())
            bad_streak = bad_streak + 1 if record["bad"] else 0
            if record["bad"]:
                bar.write(f"warning: non-finite loss or gradient at step {done}; optimizer step skipped", file=sys.stderr)
                if bad_streak >= cfg.max_bad_steps:
                    raise Diverged(f"{bad_streak} bad steps in a row at step {done}")
            validating = bool(cfg.val_every) and (done % cfg.val_every == 0 or done == cfg.steps)
            if validating:
                if trainer.validates:
                    record.update(trainer.validation_grid(done, val_prompts))
                    if trainer.val_scorers:
                        record.update(trainer.validation_metrics())
                utils.barrier()
            if dist.is_main:
                log.write(record)
                images = {}
                if validating and trainer.validates:
                    images["val/grid"] = validation_grid_path(cfg.run_dir, done)
                if validating or done == cfg.steps:
                    images["curves"] = os.path.join(cfg.run_dir, "curves.png")
                    write_curves(log.records(), images["curves"])
                if run is not None:
                    log_to_wandb(run, record, done, images)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    bar.write(status_line(done, cfg.steps, record))
            bar.update(1)
            # Inside a run of bad steps nothing is saved, so the newest checkpoint stays a good one; the
            # last step is always saved (a bad step changed no weight).
            if done == cfg.steps or (bad_streak == 0 and done % cfg.save_every == 0):
                export = done == cfg.steps or bool(cfg.export_every and done % cfg.export_every == 0)
                saved = save_checkpoint(trainer, done, export, latest_metrics(log.records()) if dist.is_main else {})
    return saved

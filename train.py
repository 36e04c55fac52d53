r"""DRaFT+ training: reward fine-tuning by back-propagation through the last K sampler steps, with a
KL penalty to the base model.

    # CPU smoke run on a local pipeline folder
    python train.py --model path/to/pipeline --reward pickscore --reward-source pickscore=path/to/clip \
        --steps 10 --inference-steps 10 --run-dir runs/smoke
    # the demo world on a CPU in a few minutes: a tiny pretrained model and aesthetic reward that ship with us
    python train.py --preset demo
    # 8 GPUs, Stable Diffusion 1.5 with PickScore (the defaults)
    torchrun --nproc_per_node=8 train.py --truncation-steps 1 --kl-coeff 0.1 --run-dir runs/sd15-pickscore

Running the same command again resumes from the run's latest complete checkpoint.
"""

import hashlib
import json
import os
import random
import sys
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm import tqdm

import demo_world
import generation
import models
import prompts as prompt_sets
import rewards
import utils
from utils import UsageError


@dataclass
class TrainConfig:
    # a set of defaults: "demo" trains the bundled demo world on a CPU (see PRESETS); other flags still override it
    preset: Literal["none", "demo"] = "none"
    model: str = models.DEFAULT_MODEL  # diffusers pipeline: hub id or local folder
    reward: str = "pickscore"  # reward spec: a name, or weighted names such as pickscore:1.0,aesthetic:0.05
    reward_source: list[str] = field(default_factory=list)  # NAME=PATH: load reward NAME from a local folder/file
    prompts: str = "animals"  # bundled prompt set name, or a .txt/.json/.jsonl file
    truncation_steps: int = 1  # K: the last K sampler steps keep the graph (DRaFT-K); K = inference steps is full DRaFT
    truncation_range: tuple[int, int] | None = None  # LO HI: draw K per trajectory uniformly from [LO, HI] (AlignProp)
    lv_samples: int = 0  # n > 0: DRaFT-LV, re-noise x_0 n times and denoise once with the graph
    kl_coeff: float = 0.1  # weight of the KL penalty: mean squared difference of tuned and base predictions
    inference_steps: int = 50  # sampler steps N
    guidance_scale: float = 7.5  # classifier-free guidance scale (1 turns guidance off)
    eta: float = 0.0  # DDIM eta: 0 is deterministic DDIM, 1 is DDPM-like noise
    scheduler: Literal["ddim", "pipeline"] = "ddim"  # DDIM built from the pipeline's config, or the pipeline's own scheduler
    resolution: int | None = None  # image side in pixels; default from the model config (512 for SD 1.5)
    batch_size: int = 1  # prompts per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear learning-rate warm-up steps
    max_grad_norm: float = 1.0  # gradient clipping threshold (global L2 norm)
    steps: int = 1000  # optimizer steps in total
    lora_rank: int = 32  # LoRA rank on the UNet attention projections
    lora_alpha: float = 32.0  # LoRA alpha (scale = alpha / rank)
    full_finetune: bool = False  # train every UNet weight instead of LoRA (a frozen copy is the KL base)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # autocast dtype; auto = bf16 on GPU, none on CPU
    gradient_checkpointing: bool = False  # recompute the UNet, VAE decoder and reward tower in backward to save memory
    seed: int = 0  # seeds data order, noise and truncation draws; same results on any number of GPUs
    run_dir: str = "runs/draftp"  # where checkpoints, log.jsonl and validation grids go
    save_every: int = 100  # checkpoint every this many steps (and at the end)
    val_every: int = 100  # base-vs-tuned grid of fixed prompts and seeds every this many steps (0: never)
    val_prompts: int = 4  # prompts in the validation grid
    log_every: int = 1  # print a status line every this many steps
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    wandb: bool = False  # also log to Weights & Biases
    wandb_project: str = "draftp"  # wandb project name
    device: str = "auto"  # auto, cpu or cuda


# The demo world's settings: its 32 px model, its aesthetic head as the reward, its training prompts, and
# a LoRA small and fast enough that the reward visibly rises within a few CPU minutes.
PRESETS = {
    "demo": dict(model=demo_world.DEMO_SD, reward="aesthetic", reward_source=[f"aesthetic={demo_world.DEMO_CLIP}"],
                 prompts="demo", resolution=32, inference_steps=20, guidance_scale=5.0, lora_rank=8, lora_alpha=8.0,
                 lr=3e-3, batch_size=4, steps=100, save_every=50, val_every=50, val_prompts=6, run_dir="runs/demo"),
}


def validate(cfg: TrainConfig) -> None:
    """Everything that can be checked before loading or writing anything."""
    utils.require_at_least_one(steps=cfg.steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                               lora_rank=cfg.lora_rank, save_every=cfg.save_every, log_every=cfg.log_every,
                               max_bad_steps=cfg.max_bad_steps, val_prompts=cfg.val_prompts)
    generation.validate_sampler_flags(cfg)
    for name in ("val_every", "warmup_steps", "lv_samples"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"{utils.flag(name)} must be >= 0, got {getattr(cfg, name)}")
    low, high = cfg.truncation_range or (cfg.truncation_steps, cfg.truncation_steps)
    if not 0 <= low <= high <= cfg.inference_steps:
        raise UsageError(f"truncation steps must satisfy 0 <= K <= --inference-steps ({cfg.inference_steps}), got {low}..{high}")
    if high == 0 and cfg.lv_samples == 0:
        raise UsageError("--truncation-steps 0 trains nothing: use K >= 1 or --lv-samples N")
    if cfg.lv_samples and cfg.truncation_range:
        raise UsageError("--lv-samples and --truncation-range exclude each other")
    for name in ("lr", "lora_alpha", "max_grad_norm"):
        if not getattr(cfg, name) > 0:
            raise UsageError(f"{utils.flag(name)} must be positive, got {getattr(cfg, name)}")
    if cfg.kl_coeff < 0 or cfg.weight_decay < 0:
        raise UsageError("--kl-coeff and --weight-decay must be >= 0")
    rewards.parse_reward_spec(cfg.reward)
    rewards.parse_reward_sources(cfg.reward_source)


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


def micro_batch_positions(cfg: TrainConfig, step: int, micro: int, dist: utils.Dist) -> range:
    """The global positions of this rank's micro-batch: a 1-GPU run with grad accumulation covers
    the same positions, in the same micro-batches, as a multi-GPU run with the same global batch."""
    global_batch = cfg.batch_size * cfg.grad_accum * dist.world_size
    start = step * global_batch + (micro * dist.world_size + dist.rank) * cfg.batch_size
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
    amp: torch.dtype | None

    def autocast(self):
        return torch.autocast(self.dist.device.type, dtype=self.amp, enabled=self.amp is not None)

    def rollout(self, prompts: list[str], seeds: list[int], truncation: int, lv_samples: int = 0, base_only=False):
        """Sample with the graph on the last `truncation` steps; return images and the KL."""
        cfg = self.cfg
        settings = generation.SamplerSettings(self.resolution, cfg.inference_steps, cfg.guidance_scale, cfg.eta)
        # Latents stay fp32 under autocast: the scheduler arithmetic is then that of fp32 sampling.
        return generation.generate(self.model, prompts, seeds, settings, truncation_steps=truncation,
                                   with_kl=not base_only, base_only=base_only, lv_samples=lv_samples,
                                   checkpoint_denoiser=cfg.gradient_checkpointing)

    @property
    def resolution(self) -> int:
        return self.cfg.resolution or self.model.default_resolution()

    def step(self, step: int) -> dict:
        """Accumulate gradients over the micro-batches, average over ranks, clip, update."""
        cfg = self.cfg
        self.set_lr(step)
        scores, kls, losses = [], [], []
        truncations = []
        for micro in range(cfg.grad_accum):
            positions = micro_batch_positions(cfg, step, micro, self.dist)
            batch_prompts = [self.stream.prompt(p) for p in positions]
            seeds = [self.stream.noise_seed(p) for p in positions]
            truncation = truncation_for(cfg, positions[0])
            with self.autocast():
                images, kl = self.rollout(batch_prompts, seeds, truncation, cfg.lv_samples)
                score = self.reward(images, batch_prompts * max(1, cfg.lv_samples))
            loss = -score.float().mean() + cfg.kl_coeff * kl.float()
            self.scaler.scale(loss / cfg.grad_accum).backward()
            scores.append(score.detach().float())
            kls.append(kl.detach().float())
            losses.append(loss.detach())
            truncations.append(truncation)

        params = models.trainable_parameters(self.model)
        grads = [p.grad for p in params if p.grad is not None]
        utils.all_reduce_mean_(grads)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

        all_scores = torch.cat([torch.cat(s) for s in utils.gather_objects([s.cpu() for s in scores])])
        summary = torch.tensor([torch.stack(losses).mean().item(), torch.stack(kls).mean().item()])
        utils.all_reduce_mean_([summary])
        return {
            "loss": summary[0].item(),
            "reward_mean": all_scores.mean().item(),
            "reward_std": all_scores.std().item() if all_scores.numel() > 1 else 0.0,
            "kl": summary[1].item(),
            "grad_norm": grad_norm.item(),
            "lr": self.optimizer.param_groups[0]["lr"],
            "truncation_steps": sum(truncations) / len(truncations),
            "finite": finite,
        }

    def set_lr(self, step: int) -> None:
        scale = min(1.0, (step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * scale

    @torch.no_grad()
    def validation_grid(self, step: int, val_prompts: list[str]):
        """Base and tuned side by side on the same noise, each captioned with its reward."""
        seeds = [utils.derive_seed(self.cfg.seed, 3, i) for i in range(len(val_prompts))]
        with self.autocast():
            base_images, _ = self.rollout(val_prompts, seeds, 0, base_only=True)
            tuned_images, _ = self.rollout(val_prompts, seeds, 0)
            base_scores = self.reward(base_images, val_prompts).float()
            tuned_scores = self.reward(tuned_images, val_prompts).float()
        rows = [list(pair) for pair in zip(utils.to_pil(base_images), utils.to_pil(tuned_images))]
        captions = [[f"base {b:.3g}\n{prompt}", f"tuned {t:.3g}"]
                    for prompt, b, t in zip(val_prompts, base_scores.tolist(), tuned_scores.tolist())]
        grid = utils.image_grid(rows, captions, header=["base", f"step {step}"])
        folder = os.path.join(self.cfg.run_dir, "val")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{step:07d}.png")
        utils.write_atomic_file(path, lambda tmp: grid.save(tmp, format="PNG"))
        return {"val_reward_base": base_scores.mean().item(), "val_reward_tuned": tuned_scores.mean().item()}


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(trainer: Trainer, step: int) -> None:
    """Rank 0 writes the tuned weights, optimizer, RNG and data position, and the config, atomically.

    Every rank's weight fingerprint is recorded too: they must agree, and a mismatch means the
    ranks drifted apart (non-deterministic kernels, a missed all-reduce)."""
    fingerprints = utils.gather_objects(weights_fingerprint(trainer.model))
    if trainer.dist.is_main:
        def write(folder):
            models.save_tuned(trainer.model, folder)
            torch.save({"optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict(),
                        "rng": torch.get_rng_state()}, os.path.join(folder, "trainer_state.pt"))
            utils.save_json(os.path.join(folder, "state.json"), {"step": step, "rank_fingerprints": fingerprints})
            utils.save_json(os.path.join(folder, "config.json"), asdict(trainer.cfg))

        utils.write_atomic_dir(utils.checkpoint_dir(trainer.cfg.run_dir, step), write)
    utils.barrier()


def weights_fingerprint(model: models.DiffusionModel) -> str:
    """A hash of the exact bytes of the trainable weights."""
    digest = hashlib.sha256()
    for param in models.trainable_parameters(model):
        digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def restore_checkpoint(trainer: Trainer, folder: str) -> int:
    """Load weights, optimizer, RNG and position; a damaged checkpoint ends in one line."""
    try:
        models.load_tuned_into_training(trainer.model, folder)
        state = torch.load(os.path.join(folder, "trainer_state.pt"), map_location="cpu", weights_only=True)
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        with open(os.path.join(folder, "state.json")) as f:
            return json.load(f)["step"]
    except UsageError:
        raise
    except Exception as error:  # any damage: truncated file, wrong format, missing key
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"cannot resume from {folder!r} ({text}); move it away to resume from an earlier one") from None


def check_same_run(cfg: TrainConfig) -> None:
    """A run dir belongs to one configuration; only --steps (and logging cadence) may change on resume."""
    path = os.path.join(cfg.run_dir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        previous = json.load(f)
    mutable = {"steps", "save_every", "val_every", "log_every", "wandb", "wandb_project", "device"}
    current = asdict(cfg)
    for key, value in current.items():
        old = previous.get(key)
        if key not in mutable and json.loads(json.dumps(value)) != old:
            raise UsageError(
                f"--run-dir {cfg.run_dir!r} holds a run with {key}={old!r}, not {value!r}; use another --run-dir"
            )


# ---------------------------------------------------------------------------------------------


def build(cfg: TrainConfig, dist: utils.Dist) -> Trainer:
    amp = autocast_dtype(cfg, dist.device)
    weights_dtype = amp if (amp is not None and not cfg.full_finetune) else torch.float32
    model = models.load_model(cfg.model, dist.device, weights_dtype, cfg.scheduler)
    generation.checked_resolution(model, cfg.resolution)
    if cfg.full_finetune:
        models.enable_full_finetune(model)
    else:
        models.attach_lora(model, cfg.lora_rank, cfg.lora_alpha)
    if cfg.gradient_checkpointing:
        model.pipe.vae.enable_gradient_checkpointing()
    reward = rewards.load_reward(cfg.reward, rewards.parse_reward_sources(cfg.reward_source), dtype=weights_dtype, device=dist.device,
                                 gradient_checkpointing=cfg.gradient_checkpointing)
    optimizer = torch.optim.AdamW(models.trainable_parameters(model), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp == torch.float16)
    stream = PromptStream(prompt_sets.load_prompts(cfg.prompts), cfg.seed)
    return Trainer(cfg, dist, model, reward, optimizer, scaler, stream, amp)


def start_wandb(cfg: TrainConfig):
    try:
        import wandb
    except ImportError:
        raise UsageError("--wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project=cfg.wandb_project, config=asdict(cfg), dir=cfg.run_dir, resume="allow",
                      id=utils.derive_seed(*map(ord, os.path.abspath(cfg.run_dir))).__format__("x"))


def status_line(step: int, total: int, record: dict) -> str:
    return (f"step {step}/{total} loss {record['loss']:.4f} reward {record['reward_mean']:.4f}"
            f"±{record['reward_std']:.3f} kl {record['kl']:.3e} |g| {record['grad_norm']:.3f} "
            f"{record['sec_per_step']:.2f}s/step {record['images_per_s']:.2f} img/s")


class Diverged(Exception):
    pass


def spread(items: list, count: int) -> list:
    """`count` items evenly spread over the list (a sorted prompt set's head would be all alike)."""
    return [items[i * len(items) // count] for i in range(min(count, len(items)))]


def run_steps(trainer: Trainer, start: int, log: utils.JsonlLog, run, val_prompts: list[str]) -> None:
    """Steps `start` .. cfg.steps with logging, validation grids and checkpoints; raises Diverged."""
    cfg, dist = trainer.cfg, trainer.dist
    global_batch = cfg.batch_size * cfg.grad_accum * dist.world_size
    bad_streak = 0
    bar = tqdm(total=cfg.steps, initial=start, disable=not dist.is_main, desc="train", dynamic_ncols=True)
    for step in range(start, cfg.steps):
        done = step + 1
        timer = utils.Timer()
        if dist.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dist.device)
        record = trainer.step(step)
        seconds = timer.seconds()
        record.update(step=done, sec_per_step=seconds, images_per_s=global_batch / seconds,
                      peak_mem_mb=utils.peak_memory_mb(dist.device))
        bad_streak = 0 if record["finite"] else bad_streak + 1
        if not record["finite"]:
            bar.write(f"warning: non-finite loss or gradient at step {done}; optimizer step skipped", file=sys.stderr)
            if bad_streak >= cfg.max_bad_steps:
                bar.close()
                raise Diverged(f"{bad_streak} non-finite steps in a row at step {done}")
        if cfg.val_every and (done % cfg.val_every == 0 or done == cfg.steps):
            if dist.is_main:
                record.update(trainer.validation_grid(done, val_prompts))
            utils.barrier()
        if dist.is_main:
            log.write(record)
            if run is not None:
                run.log(record, step=done)
            if done % cfg.log_every == 0 or done == cfg.steps:
                bar.write(status_line(done, cfg.steps, record))
        bar.update(1)
        # Inside a run of skipped steps nothing is saved, so the newest checkpoint stays a good one.
        if bad_streak == 0 and (done % cfg.save_every == 0 or done == cfg.steps):
            save_checkpoint(trainer, done)
    bar.close()


@utils.exit_cleanly_on_usage_error
def main(cfg: TrainConfig) -> None:
    validate(cfg)
    dist = utils.init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    trainer = build(cfg, dist)
    check_same_run(cfg)
    utils.ensure_writable_dir(cfg.run_dir)

    start = 0
    latest = utils.latest_checkpoint(cfg.run_dir)
    if latest:
        start = restore_checkpoint(trainer, latest)
        utils.print0(f"resuming from {latest} (step {start})")
    if dist.is_main:
        utils.save_json(os.path.join(cfg.run_dir, "config.json"), asdict(cfg))
    run = start_wandb(cfg) if (cfg.wandb and dist.is_main) else None
    timer = utils.Timer()
    try:
        run_steps(trainer, start, utils.JsonlLog(os.path.join(cfg.run_dir, "log.jsonl")), run,
                  spread(trainer.stream.prompts, cfg.val_prompts))
    except Diverged as error:
        kept = utils.latest_checkpoint(cfg.run_dir) or "none yet"
        print(f"error: training diverged: {error}; last good checkpoint: {kept}", file=sys.stderr)
        sys.exit(1)
    if run is not None:
        run.finish()
    utils.print0(f"done: {cfg.steps} steps ({cfg.steps - start} in {timer.seconds():.0f} s), "
                 f"checkpoints in {os.path.join(cfg.run_dir, 'checkpoints')}")
    utils.shutdown_distributed()


if __name__ == "__main__":
    main(utils.cli_with_presets(TrainConfig, PRESETS, __doc__))

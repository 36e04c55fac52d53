r"""DRaFT+ training: reward fine-tuning by back-propagation through the last K sampler steps, with a
KL penalty to the base model.

    # CPU smoke run on a local pipeline folder
    python train.py --model path/to/pipeline --reward pickscore --reward-source pickscore=path/to/clip \
        --steps 10 --inference-steps 10 --run-dir runs/smoke
    # the demo world on a CPU in a few minutes: a tiny pretrained model and aesthetic reward that ship with us
    python train.py --preset demo
    # 8 GPUs, Stable Diffusion 1.5 with PickScore (the defaults)
    torchrun --nproc_per_node=8 train.py --truncation-steps 1 --kl-coeff 0.1 --run-dir runs/sd15-pickscore
    # 8 GPUs, SD3.5 Medium at its family's defaults (40 steps, guidance 4.5, 512 px, LoRA rank 32 / alpha 64)
    torchrun --nproc_per_node=8 train.py --model stabilityai/stable-diffusion-3.5-medium \
        --truncation-steps 1 --kl-coeff 0.1 --run-dir runs/sd35m-pickscore

Running the same command again resumes from the run's latest complete checkpoint.
"""

import os
import shutil
import sys

import torch

import demo_world
import models
import training
import utils
from training import TrainConfig

# The demo world's settings: its 32 px model, its aesthetic head as the reward, its training prompts, a
# LoRA small and fast enough that the reward visibly rises within a few CPU minutes, and the gold evaluator
# on held-out prompts and seeds beside it, so that reward hacking shows in curves.png as it happens. One
# torch thread: on a laptop's few cores, more threads spin against any other busy process (docs/demo.md).
PRESETS = {
    "demo": dict(model=demo_world.DEMO_SD, reward="aesthetic", reward_source=demo_world.AESTHETIC_SOURCE,
                 prompts="demo", resolution=32, **demo_world.SAMPLING, lora_rank=8, lora_alpha=8.0,
                 lr=3e-3, batch_size=4, steps=100, save_every=50, val_every=25, val_prompts=6, run_dir="runs/demo",
                 val_metrics=("gold_aesthetic", "gold_fidelity", "gold_shape", "gold_diversity"),
                 val_metrics_prompts=demo_world.EVAL_PROMPTS, val_metrics_num_prompts=6, val_metrics_repeats=2,
                 val_metrics_seed=demo_world.EVALUATION["seed"], threads=1),
}


def hold_run_dir(cfg: TrainConfig, dist: utils.Dist):
    """Rank 0 holds the run dir for the whole run, so that a second training on it stops at once."""
    if not dist.is_main:
        return None
    created = not os.path.isdir(cfg.run_dir)
    utils.ensure_writable_dir(cfg.run_dir)
    try:
        return utils.hold_run_dir(cfg.run_dir, required=cfg.require_run_dir_lock)
    except utils.UsageError:
        if created:  # refused: nothing left behind
            shutil.rmtree(cfg.run_dir)
        raise


@utils.exit_cleanly_on_usage_error
def main(cfg: TrainConfig) -> None:
    training.validate(cfg)
    dist = utils.init_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg = training.check_same_run(cfg, dist.world_size)
    if (warning := training.memory_warning(cfg)) and dist.is_main:
        print(warning, file=sys.stderr, flush=True)
    cfg = training.resolved(cfg, models.detect_family(cfg.model))
    if cfg.fsdp and dist.world_size > 1:  # every rank writes and reads its shards in the run dir
        utils.check_run_dir_shared(cfg.run_dir, dist)
    # A run dir that exists may be another training's: find out before minutes of loading. A new one is
    # created only once everything has loaded, so that bad input leaves nothing behind.
    lock = hold_run_dir(cfg, dist) if os.path.isdir(cfg.run_dir) else None
    torch.manual_seed(cfg.seed)
    trainer = training.build(cfg, dist)
    lock = lock or hold_run_dir(cfg, dist)

    log = utils.JsonlLog(os.path.join(cfg.run_dir, "log.jsonl"))
    start, latest = training.resume(trainer)
    if latest:
        utils.print0(f"resuming from {latest} (step {start})")
    if dist.is_main:
        log.drop_after(start)
        utils.save_json(os.path.join(cfg.run_dir, "config.json"), training.run_record(cfg, dist.world_size))
    run = training.start_wandb(cfg, start) if (cfg.wandb and dist.is_main) else None
    timer = utils.Timer()
    try:
        saved = training.run_steps(trainer, start, log, run, training.spread(trainer.stream.prompts, cfg.val_prompts))
    except (training.Diverged, training.ReplicasDisagree) as error:
        kept = utils.broadcast_from_main(lambda: utils.latest_checkpoint(cfg.run_dir))  # every rank stops here
        what = "training diverged" if isinstance(error, training.Diverged) else "training stopped"
        print(f"error: {what}: {error}; last good checkpoint: {kept or 'none yet'}", file=sys.stderr)
        sys.exit(1)
    if run is not None:
        run.finish()
    utils.print0(f"done: {cfg.steps} steps ({cfg.steps - start} in {timer.seconds():.0f} s), "
                 f"last checkpoint {saved or latest}")
    utils.shutdown_distributed()


if __name__ == "__main__":
    main(utils.cli_with_presets(TrainConfig, PRESETS, __doc__))

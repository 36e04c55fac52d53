r"""Image grids of prompts by seeds: from the base model, from a training checkpoint, base and tuned
side by side on the same noise, or any annealed-guidance mix.

    # CPU smoke run on a checkpoint of a local pipeline
    python generate.py --checkpoint runs/smoke/checkpoints/step-0000010 --prompt "a cat" "a dog" \
        --num-images 2 --inference-steps 10 --side-by-side --out out/grid.png
    # the base model alone
    python generate.py --model path/to/pipeline --prompts animals --out out/base.png
    # the demo world: base and tuned on held-out prompts and seeds, as metrics.py --preset demo draws them
    python generate.py --preset demo --checkpoint runs/demo/checkpoints/step-0000100 --side-by-side
    # 2 GPUs: base and tuned SD 1.5 side by side on the first 8 bundled eval prompts
    torchrun --nproc_per_node=2 generate.py --checkpoint runs/sd15-pickscore/checkpoints/step-0001000 \
        --side-by-side --max-prompts 8 --out out/sd15-grid.png

One row per prompt; for each seed, one column per weighing. Image (prompt p, repeat r) starts from
the same noise as anneal.py's img_<p>_<r> with the same --seed, so the two agree.
"""

import itertools
import os
from dataclasses import dataclass
from typing import Literal

import torch

import demo_world
import generation
import prompts as prompt_sets
import utils
from utils import UsageError

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


@dataclass(kw_only=True)
class GenerateConfig(generation.InferenceOptions):
    # a set of defaults: "demo" draws the demo world as metrics.py --preset demo does (see PRESETS)
    preset: Literal["none", "demo"] = "none"
    # tuned weights, applied in order: training checkpoint folders (runs/NAME/checkpoints/step-0001000), FDFO
    # adapter folders, RTDMD .pt LoRAs (stacked: cold start, then RL); none: the base model alone
    checkpoint: tuple[str, ...] = ()
    out: str = "out/grid.png"  # grid image to write (.png, .jpg or .webp)
    prompts: str = "eval_small"  # bundled prompt set name, or a .txt/.json/.jsonl file
    prompt: tuple[str, ...] = ()  # prompts given on the command line, used instead of --prompts
    max_prompts: int = 4  # grid rows: the first this many prompts
    num_images: int = 4  # seeds per prompt
    side_by_side: bool = False  # base and tuned next to each other on the same noise (same as --weighing base draft)
    # annealed-guidance mixes per seed (base, draft, linear, power_P, step_F); default draft, or base with no --checkpoint
    weighing: tuple[str, ...] = ()


# The demo world's model, held-out prompts, seeds and sampler settings, as metrics.py --preset demo uses them.
PRESETS = {"demo": dict(prompts=demo_world.EVAL_PROMPTS, max_prompts=6, num_images=demo_world.EVAL_IMAGES,
                        out="out/demo-grid.png", **demo_world.EVALUATION)}


def validate(cfg: GenerateConfig) -> None:
    """Everything that can be checked before loading or writing anything."""
    utils.require_at_least_one(max_prompts=cfg.max_prompts, num_images=cfg.num_images)
    generation.validate_shared_options(cfg)
    if os.path.splitext(cfg.out)[1].lower() not in IMAGE_FORMATS:
        raise UsageError(f"--out {cfg.out!r} must end in one of {', '.join(IMAGE_FORMATS)}")
    if cfg.side_by_side and cfg.weighing:
        raise UsageError("give --side-by-side or --weighing, not both (--side-by-side is --weighing base draft)")
    tuned_only = [name for name in weighing_names(cfg) if name != "base"]
    if not cfg.checkpoint and tuned_only:
        asked = "--side-by-side" if cfg.side_by_side else f"--weighing {tuned_only[0]}"
        raise UsageError(f"{asked} needs a tuned model: give --checkpoint (without one there is only base)")
    chosen_prompts(cfg)


def weighing_names(cfg: GenerateConfig) -> list[str]:
    if cfg.side_by_side:
        return ["base", "draft"]
    if not cfg.weighing:
        return ["draft" if cfg.checkpoint else "base"]
    return generation.weighing_list(cfg.weighing)


def chosen_prompts(cfg: GenerateConfig) -> list[str]:
    return (list(cfg.prompt) or prompt_sets.load_prompts(cfg.prompts))[: cfg.max_prompts]


# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def render_share(cfg: GenerateConfig, model, weighings: list[str], all_prompts: list[str], dist: utils.Dist) -> dict:
    """This rank's share of the (prompt, repeat) cells, every weighing: {(p, r, weighing): PIL image}."""
    jobs = [(p, r) for p in range(len(all_prompts)) for r in range(cfg.num_images)]
    mine = prompt_sets.shard(jobs, dist.rank, dist.world_size)
    images = {}
    for batch, weighing, rendered in generation.render_batches(
            model, dict(enumerate(all_prompts)), mine, weighings, generation.SamplerSettings.of(cfg), seed=cfg.seed,
            batch_size=cfg.batch_size, desc="generate", show_bar=dist.is_main):
        images.update({(p, r, weighing): picture for (p, r), picture in zip(batch, utils.to_pil(rendered))})
    return images


def assemble_grid(cfg: GenerateConfig, images: dict, weighings: list[str], all_prompts: list[str]):
    """Rows are prompts, captioned under their first image; columns are seeds, each split by weighing."""
    columns = list(itertools.product(range(cfg.num_images), weighings))
    rows = [[images[p, r, w] for r, w in columns] for p in range(len(all_prompts))]
    captions = [[prompt] + [""] * (len(columns) - 1) for prompt in all_prompts]
    header = [f"#{r} {w}" if len(weighings) > 1 else f"#{r}" for r, w in columns]
    return utils.image_grid(rows, captions, header)


@utils.exit_cleanly_on_usage_error
def main(cfg: GenerateConfig) -> None:
    validate(cfg)
    weighings, all_prompts = weighing_names(cfg), chosen_prompts(cfg)
    dist = utils.init_distributed(cfg.device)
    generation.print_protocol(cfg)
    model, cfg = generation.load_for_inference(cfg, cfg.checkpoint, dist.device)
    utils.ensure_writable_dir(os.path.dirname(os.path.abspath(cfg.out)))

    local = render_share(cfg, model, weighings, all_prompts, dist)
    gathered = utils.gather_objects(local)
    if dist.is_main:
        grid = assemble_grid(cfg, {k: v for part in gathered for k, v in part.items()}, weighings, all_prompts)
        image_format = IMAGE_FORMATS[os.path.splitext(cfg.out)[1].lower()]
        utils.write_atomic_file(cfg.out, lambda tmp: grid.save(tmp, format=image_format))
        print(f"wrote {cfg.out}: {len(all_prompts)} prompts x {cfg.num_images} seeds x {', '.join(weighings)}",
              flush=True)
    utils.barrier()
    utils.shutdown_distributed()


if __name__ == "__main__":
    main(utils.cli_with_presets(GenerateConfig, PRESETS, __doc__, protocols=generation.PROTOCOLS))

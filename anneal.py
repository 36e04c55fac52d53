r"""Annealed guidance (AIG): trade reward against diversity at inference time by mixing the base and
the tuned model's predictions with a weight that changes over the sampler steps.

    # CPU smoke run on a checkpoint of a local pipeline
    python anneal.py --checkpoint runs/smoke/checkpoints/step-0000010 --prompt "a cat" --num-images 2 \
        --inference-steps 10 --out out/anneal
    # 8 GPUs: the default weighings on the bundled eval prompts, scored with PickScore
    torchrun --nproc_per_node=8 anneal.py --checkpoint runs/sd15-pickscore/checkpoints/step-0001000 \
        --score pickscore --out out/anneal-sd15

At sampler step i of N (i = 0 the noisiest) the prediction is (1 - w) * base + w * tuned, with the
weighing w(i, N) one of: base (0), draft (1), linear (i/N), power_P ((i/N)^P), step_F (1 once
i/N >= F). For a given (prompt, repeat) every weighing starts from the same noise.

Writes under --out (files of the same name are replaced):
    <weighing>/img_<prompt>_<repeat>.png, <weighing>/prompt_<prompt>.txt
    grids/grid_<prompt>.png       one row per repeat, one column per weighing
    with --score: scores.jsonl (every image), tradeoff.json and tradeoff.md (mean reward and
    diversity per weighing), tradeoff_<reward>.png (mean reward against diversity)

Diversity of a weighing: per prompt, the mean over pairs of its images of their root-mean-square
pixel difference (images resized to 64x64, values in [0, 1]), averaged over prompts; 0 means
identical images. It is a simple pixel-space stand-in for DreamSim, which cannot be assumed
downloadable here.
"""

import itertools
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import tyro
from PIL import Image, ImageDraw, ImageFont

import generation
import prompts as prompt_sets
import rewards
import sampling
import utils
from utils import UsageError

DIVERSITY_SIDE = 64


@dataclass(kw_only=True)
class AnnealConfig(generation.InferenceOptions, generation.RewardSourceOption):
    # tuned weights, applied in order: training checkpoint folders (runs/NAME/checkpoints/step-0001000), FDFO
    # adapter folders, RTDMD .pt LoRAs (stacked: cold start, then RL)
    checkpoint: tuple[str, ...]
    # tuned-model weight w at step i of N: base 0, draft 1, linear i/N, power_P (i/N)^P, step_F 1 once i/N >= F
    weighing: tuple[str, ...] = sampling.DEFAULT_WEIGHINGS
    prompts: str = "eval_small"  # bundled prompt set name, or a .txt/.json/.jsonl file
    prompt: tuple[str, ...] = ()  # prompts given on the command line, used instead of --prompts
    max_prompts: int | None = None  # use only the first this many prompts
    num_images: int = 4  # images per prompt and weighing
    # reward names (e.g. pickscore hpsv2) to score every image with, in float32; adds the reward-diversity table and plot
    score: tuple[str, ...] = ()
    out: str = "out/anneal"  # output folder


def validate(cfg: AnnealConfig) -> None:
    """Everything that can be checked before loading or writing anything."""
    utils.require_at_least_one(num_images=cfg.num_images,
                               max_prompts=1 if cfg.max_prompts is None else cfg.max_prompts)
    if not cfg.checkpoint:
        raise UsageError("--checkpoint needs at least one checkpoint: annealing mixes a tuned model with its base")
    generation.validate_shared_options(cfg)
    weighing_names(cfg)
    for i, name in enumerate(cfg.score):
        if name not in rewards.REWARD_NAMES or name in cfg.score[:i]:
            raise UsageError(f"--score {name!r}: give each reward once, from {', '.join(rewards.REWARD_NAMES)}")
    if cfg.score and cfg.num_images < 2:
        raise UsageError("--score also measures the diversity among a prompt's images: "
                         f"use --num-images 2 or more, got {cfg.num_images}")
    chosen_prompts(cfg)


def weighing_names(cfg: AnnealConfig) -> list[str]:
    return generation.weighing_list(cfg.weighing)


def chosen_prompts(cfg: AnnealConfig) -> list[str]:
    return (list(cfg.prompt) or prompt_sets.load_prompts(cfg.prompts))[: cfg.max_prompts]


# ---------------------------------------------------------------------------------------------
# Files


def image_path(out: str, weighing: str, prompt_index: int, repeat: int) -> str:
    return os.path.join(out, weighing, f"img_{prompt_index:05d}_{repeat:03d}.png")


def save_image(image, path: str) -> None:
    utils.write_atomic_file(path, lambda tmp: image.save(tmp, format="PNG"))


def save_text(text: str, path: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")

    utils.write_atomic_file(path, write)


@torch.no_grad()
def render_and_score_share(cfg: AnnealConfig, model, reward, weighings: list[str], all_prompts: list[str],
                           dist: utils.Dist) -> tuple[list[dict], dict]:
    """This rank's share of the prompts, every repeat and weighing: images, prompt files and grids
    written, one record per image, and with --score {(weighing, prompt): diversity}. A prompt's grid
    and diversity come from the images in memory, so no rank reads another's files (nodes need not
    share a filesystem)."""
    mine = prompt_sets.shard(list(range(len(all_prompts))), dist.rank, dist.world_size)
    jobs = [(p, r) for p in mine for r in range(cfg.num_images)]
    for folder in [*weighings, "grids"]:
        os.makedirs(os.path.join(cfg.out, folder), exist_ok=True)
    records, diversities = [], {}
    pending: dict[int, dict[tuple[str, int], Image.Image]] = {}
    texts = dict(enumerate(all_prompts))
    for batch, weighing, images in generation.render_batches(
            model, texts, jobs, weighings, generation.SamplerSettings.of(cfg), seed=cfg.seed,
            batch_size=cfg.batch_size, desc="anneal", show_bar=dist.is_main):
        scores = rewards.per_reward_scores(reward, images, [texts[p] for p, _ in batch]) if reward else {}
        for k, ((p, r), image) in enumerate(zip(batch, utils.to_pil(images))):
            save_image(image, image_path(cfg.out, weighing, p, r))
            if r == 0:
                save_text(all_prompts[p], os.path.join(cfg.out, weighing, f"prompt_{p:05d}.txt"))
            records.append({"weighing": weighing, "prompt_index": p, "repeat": r, "prompt": all_prompts[p],
                            **{name: values[k].item() for name, values in scores.items()}})
            pending.setdefault(p, {})[weighing, r] = image
        for p in dict.fromkeys(p for p, _ in batch):
            if len(pending[p]) == len(weighings) * cfg.num_images:
                diversities.update(finish_prompt(cfg, p, pending.pop(p), weighings, records))
    return records, diversities


# ---------------------------------------------------------------------------------------------
# Grids and the reward-diversity trade-off


def diversity(images: list) -> float:
    """Mean pairwise root-mean-square pixel difference of PIL images resized to 64x64, values in [0, 1]."""
    side = (DIVERSITY_SIDE, DIVERSITY_SIDE)
    flat = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize(side), dtype=np.float32)).flatten()
                        for im in images]) / 255
    return (torch.pdist(flat) / math.sqrt(flat.shape[1])).mean().item()


def finish_prompt(cfg: AnnealConfig, p: int, images: dict, weighings: list[str], records: list[dict]) -> dict:
    """Write prompt p's grid (one row per repeat, one column per weighing); with --score return its
    {(weighing, p): diversity}."""
    caption_reward = cfg.score[0] if cfg.score else None
    rows = [[images[w, r] for w in weighings] for r in range(cfg.num_images)]
    captions = None
    if caption_reward:
        score_of = {(rec["weighing"], rec["repeat"]): rec[caption_reward] for rec in records if rec["prompt_index"] == p}
        captions = [[f"{score_of[w, r]:.4g}" for w in weighings] for r in range(cfg.num_images)]
    save_image(utils.image_grid(rows, captions, header=weighings), os.path.join(cfg.out, "grids", f"grid_{p:05d}.png"))
    if not cfg.score:
        return {}
    return {(w, p): diversity([images[w, r] for r in range(cfg.num_images)]) for w in weighings}


def summarize(cfg: AnnealConfig, weighings: list[str], records: list[dict], diversities: dict,
              num_prompts: int) -> list[dict]:
    """Per weighing: mean and std of each reward over all its images, and mean diversity over prompts."""
    rows = []
    for w in weighings:
        row = {"weighing": w, "diversity": sum(diversities[w, p] for p in range(num_prompts)) / num_prompts}
        for name in cfg.score:
            values = torch.tensor([rec[name] for rec in records if rec["weighing"] == w], dtype=torch.float64)
            row[name] = values.mean().item()
            row[f"{name}_std"] = values.std().item()
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], reward_names: tuple[str, ...]) -> str:
    head = ["weighing", *(f"{name} (mean ± std)" for name in reward_names), "diversity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        rewards_cells = [f"{row[name]:.4f} ± {row[name + '_std']:.4f}" for name in reward_names]
        cells = [row["weighing"], *rewards_cells, f"{row['diversity']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tradeoff_plot(points: list[tuple[str, float, float]], reward_name: str):
    """Mean reward (y) against diversity (x): one labelled dot per weighing."""
    width, height, left, bottom, top, pad = 720, 520, 90, 60, 50, 30
    font = ImageFont.load_default(size=14)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    def axis(values, start, end):
        low, high = min(values), max(values)
        margin = (high - low) * 0.15 or abs(high) * 0.1 or 1.0
        low, high = low - margin, high + margin
        return low, high, lambda v: start + (v - low) / (high - low) * (end - start)

    x_low, x_high, to_x = axis([x for _, x, _ in points], left, width - pad)
    y_low, y_high, to_y = axis([y for _, _, y in points], height - bottom, top)
    draw.line([(left, top), (left, height - bottom), (width - pad, height - bottom)], fill="black", width=2)
    for fraction in (0.0, 0.5, 1.0):
        x_value, y_value = x_low + fraction * (x_high - x_low), y_low + fraction * (y_high - y_low)
        draw.text((to_x(x_value), height - bottom + 8), f"{x_value:.4g}", fill="black", font=font, anchor="mt")
        draw.text((left - 8, to_y(y_value)), f"{y_value:.4g}", fill="black", font=font, anchor="rm")
    draw.text(((left + width - pad) / 2, height - 8), "diversity (mean pairwise RMS pixel difference)",
              fill="black", font=font, anchor="mb")
    draw.text((left, top - 16), f"mean {reward_name}", fill="black", font=font, anchor="mb")
    for name, x_value, y_value in points:
        x, y = to_x(x_value), to_y(y_value)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=(31, 119, 180))
        draw.text((x + 8, y - 8), name, fill="black", font=font, anchor="lb")
    return image


def write_tradeoff(cfg: AnnealConfig, rows: list[dict], records: list[dict], num_prompts: int) -> str:
    order = {row["weighing"]: i for i, row in enumerate(rows)}
    ordered = sorted(records, key=lambda rec: (order[rec["weighing"]], rec["prompt_index"], rec["repeat"]))
    save_text("\n".join(json.dumps(rec) for rec in ordered), os.path.join(cfg.out, "scores.jsonl"))
    summary = {"checkpoint": cfg.checkpoint, "raw_weights": cfg.raw_weights, "num_prompts": num_prompts, "num_images": cfg.num_images,
               "inference_steps": cfg.inference_steps, "guidance_scale": cfg.guidance_scale, "seed": cfg.seed,
               "diversity": "mean over prompts of the mean pairwise RMS pixel difference at "
                            f"{DIVERSITY_SIDE}x{DIVERSITY_SIDE}, values in [0, 1]",
               "weighings": rows}
    utils.save_json(os.path.join(cfg.out, "tradeoff.json"), summary)
    table = markdown_table(rows, cfg.score)
    save_text(table.rstrip("\n"), os.path.join(cfg.out, "tradeoff.md"))
    for name in cfg.score:
        plot = tradeoff_plot([(row["weighing"], row["diversity"], row[name]) for row in rows], name)
        save_image(plot, os.path.join(cfg.out, f"tradeoff_{name}.png"))
    return table


# ---------------------------------------------------------------------------------------------


@utils.exit_cleanly_on_usage_error
def main(cfg: AnnealConfig) -> None:
    validate(cfg)
    weighings, all_prompts = weighing_names(cfg), chosen_prompts(cfg)
    dist = utils.init_distributed(cfg.device)
    model, cfg = generation.load_for_inference(cfg, cfg.checkpoint, dist.device)
    reward = None
    if cfg.score:
        # float32 whatever the generation dtype: bf16 would quantise a PickScore near 21 to steps of 0.125
        reward = rewards.load_reward(",".join(cfg.score), rewards.parse_reward_sources(cfg.reward_source),
                                     dtype=torch.float32, device=dist.device)
    utils.ensure_writable_dir(cfg.out)

    local_records, local_diversity = render_and_score_share(cfg, model, reward, weighings, all_prompts, dist)
    records = list(itertools.chain.from_iterable(utils.gather_objects(local_records)))
    diversities = {k: v for part in utils.gather_objects(local_diversity) for k, v in part.items()}
    if dist.is_main and cfg.score:
        rows = summarize(cfg, weighings, records, diversities, len(all_prompts))
        print(write_tradeoff(cfg, rows, records, len(all_prompts)), end="", flush=True)
    utils.print0(f"done: {len(records)} images of {len(weighings)} weighings in {cfg.out}")
    utils.barrier()
    utils.shutdown_distributed()


if __name__ == "__main__":
    main(tyro.cli(AnnealConfig, description=__doc__))

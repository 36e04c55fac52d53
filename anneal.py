r"""Annealed guidance (AIG): trade reward against diversity at inference time by mixing the base and
the tuned model's predictions with a weight that changes over the sampler steps.

    # CPU smoke run on a checkpoint of a local pipeline
    python anneal.py --checkpoint runs/smoke/checkpoints/step-0000010 --prompt "a cat" --num-images 2 \
        --inference-steps 10 --out out/anneal
    # the demo world: anneal a checkpoint of train.py --preset demo on the held-out prompts and seeds of
    # metrics.py --preset demo, scored with the learned and the gold aesthetic, fidelity and shape
    python anneal.py --preset demo --checkpoint runs/demo/checkpoints/step-0000100 --out out/anneal-demo
    # 8 GPUs: the default weighings on the bundled eval prompts, scored with PickScore
    torchrun --nproc_per_node=8 anneal.py --checkpoint runs/sd15-pickscore/checkpoints/step-0001000 \
        --score pickscore --out out/anneal-sd15
    # the same plot with the points of other runs on it (metrics.py JSONs, other anneal.py folders)
    python anneal.py --preset demo --checkpoint runs/demo/checkpoints/step-0000100 \
        --compare runs/demo-kl0.1/metrics.json runs/demo-kl1/metrics.json

At sampler step i of N (i = 0 the noisiest) the prediction is (1 - w) * base + w * tuned, with the
weighing w(i, N) one of: base (0), draft (1), linear (i/N), power_P ((i/N)^P), step_F (1 once
i/N >= F). For a given (prompt, repeat) every weighing starts from the same noise.

Writes under --out (files of the same name are replaced):
    <weighing>/img_<prompt>_<repeat>.png, <weighing>/prompt_<prompt>.txt
    grids/grid_<prompt>.png       one row per repeat, one column per weighing
    with --score: scores.jsonl (every image), tradeoff.json and tradeoff.md (mean score and
    diversity per weighing), tradeoff_<score>.png (mean score against diversity, with the points of
    --compare)

Scores are those of metrics.py (the same registry and scales, hpsv2 as 100 x cosine), of the images
as saved (8-bit PNG), so that `metrics.py --images OUT` gives the same numbers.

Diversity of a weighing: per prompt, the mean over pairs of its images of their root-mean-square
pixel difference (values in [0, 1]; images larger than 64x64 are first resized to 64x64), averaged
over prompts; 0 means identical images. Up to 64 px it is metrics.py's gold_diversity. It is a simple
pixel-space stand-in for DreamSim, which cannot be assumed downloadable here.
"""

import itertools
import json
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

import demo_world
import evaluation
import generation
import plots
import prompts as prompt_sets
import rewards
import sampling
import utils
from utils import UsageError

DIVERSITY_SIDE = 64
# Metrics of metrics.py that score one image at a time (rewards, the demo world's gold evaluator).
PER_IMAGE_METRICS = [name for name, spec in evaluation.METRICS.items() if spec.min_repeats == 1]


@dataclass(kw_only=True)
class AnnealConfig(generation.InferenceOptions, generation.RewardSourceOption):
    # a set of defaults: "demo" anneals a demo-world checkpoint as metrics.py --preset demo evaluates it (see PRESETS)
    preset: Literal["none", "demo"] = "none"
    # tuned weights, applied in order: training checkpoint folders (runs/NAME/checkpoints/step-0001000), FDFO
    # adapter folders, RTDMD .pt LoRAs (stacked: cold start, then RL)
    checkpoint: tuple[str, ...] = ()
    # tuned-model weight w at step i of N: base 0, draft 1, linear i/N, power_P (i/N)^P, step_F 1 once i/N >= F
    weighing: tuple[str, ...] = sampling.DEFAULT_WEIGHINGS
    prompts: str = "eval_small"  # bundled prompt set name, or a .txt/.json/.jsonl file
    prompt: tuple[str, ...] = ()  # prompts given on the command line, used instead of --prompts
    max_prompts: int | None = None  # use only the first this many prompts
    num_images: int = 4  # images per prompt and weighing
    # metrics of one image (rewards such as pickscore hpsv2, the demo world's gold_*) to score every image with, in
    # float32, on metrics.py's scales; adds the score-diversity table and plots
    score: tuple[str, ...] = ()
    # other results to draw on the trade-off plots: metrics.py JSON files (their gold_diversity is this script's
    # diversity) or other anneal.py --out folders (their tradeoff.json)
    compare: tuple[str, ...] = ()
    out: str = "out/anneal"  # output folder


# The demo world: held-out prompts and seeds, sampler settings and metrics of metrics.py --preset demo, and
# the default weighings with a few more step_F and power_P.
PRESETS = {
    "demo": dict(prompts=demo_world.EVAL_PROMPTS, num_images=demo_world.EVAL_IMAGES, **demo_world.EVALUATION,
                 score=("aesthetic", "gold_aesthetic", "gold_fidelity", "gold_shape"),
                 weighing=(*sampling.DEFAULT_WEIGHINGS, "power_0.5", "step_0.3", "step_0.8"),
                 reward_source=demo_world.AESTHETIC_SOURCE, out="out/anneal-demo"),
}


def validate(cfg: AnnealConfig) -> list["Compared"]:
    """Everything that can be checked before loading or writing anything; returns the --compare series."""
    utils.require_at_least_one(num_images=cfg.num_images,
                               max_prompts=1 if cfg.max_prompts is None else cfg.max_prompts)
    if not cfg.checkpoint:
        raise UsageError("--checkpoint needs at least one checkpoint: annealing mixes a tuned model with its base")
    generation.validate_shared_options(cfg)
    weighing_names(cfg)
    for i, name in enumerate(cfg.score):
        if name not in PER_IMAGE_METRICS or name in cfg.score[:i]:
            raise UsageError(f"--score {name!r}: give each metric once, from {', '.join(PER_IMAGE_METRICS)}")
    if cfg.score and cfg.num_images < 2:
        raise UsageError("--score also measures the diversity among a prompt's images: "
                         f"use --num-images 2 or more, got {cfg.num_images}")
    if cfg.compare and not cfg.score:
        raise UsageError("--compare draws other results on the trade-off plots of --score: add --score")
    chosen_prompts(cfg)
    return [compared_result(path, cfg.score) for path in cfg.compare]


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
def render_and_score_share(cfg: AnnealConfig, model, scorers: dict, weighings: list[str], all_prompts: list[str],
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
        saved = evaluation.as_saved(images)
        scores = {name: evaluation.METRICS[name].scale * score(saved, [texts[p] for p, _ in batch])
                  for name, score in scorers.items()}
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
    """Mean pairwise root-mean-square pixel difference of PIL images (resized to 64x64 when larger), values in [0, 1]."""
    def pixels(image):
        image = image.convert("RGB")
        if max(image.size) > DIVERSITY_SIDE:
            image = image.resize((DIVERSITY_SIDE, DIVERSITY_SIDE))
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).flatten() / 255

    return evaluation.mean_pairwise_rms_distance(torch.stack([pixels(image) for image in images]))


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


def tradeoff_plot(rows: list[dict], name: str, compared: list["Compared"]):
    """Mean score (y) against diversity (x): one labelled dot per weighing, and the --compare results."""
    ours = plots.Series("this run", [plots.Point(row["diversity"], row[name], row["weighing"]) for row in rows])
    others = [plots.Series(one.label, one.points[name]) for one in compared]
    return plots.figure([plots.Panel([ours, *others], "diversity (mean pairwise RMS pixel difference)",
                                     f"mean {name}", legend=bool(compared))])


@dataclass
class Compared:
    label: str
    points: dict[str, list[plots.Point]]  # per plotted metric, a point per row of the result


def compared_result(path: str, names: tuple[str, ...]) -> Compared:
    """Another result's points, per metric one per row: a metrics.py JSON (x its gold_diversity, with
    95% intervals) or an anneal.py --out folder (its tradeoff.json)."""
    file = os.path.join(path, "tradeoff.json") if os.path.isdir(path) else path
    try:
        with open(file) as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        raise UsageError(f"--compare {path!r}: cannot read {file!r} ({error})") from None
    points = {name: [] for name in names}
    if "weighings" in data:  # anneal.py's tradeoff.json
        for row in data["weighings"]:
            missing = [name for name in names if name not in row]
            if missing:
                raise UsageError(f"--compare {path!r} has no {missing[0]} scores; it was annealed with other --score")
            for name in names:
                points[name].append(plots.Point(row["diversity"], row[name], row["weighing"]))
    elif "results" in data:  # metrics.py's JSON
        for row_name, result in data["results"].items():
            summary = result["metrics"]
            missing = [name for name in ("gold_diversity", *names) if name not in summary]
            if missing:
                raise UsageError(f"--compare {path!r} has no {missing[0]}: evaluate it with metrics.py --metrics "
                                 f"{' '.join(('gold_diversity', *names))}")
            x = summary["gold_diversity"]
            for name in names:
                points[name].append(plots.Point(x["mean"], summary[name]["mean"], row_name, _interval(x),
                                                _interval(summary[name])))
    else:
        raise UsageError(f"--compare {path!r} is neither a metrics.py JSON nor an anneal.py tradeoff.json")
    return Compared(os.path.basename(os.path.dirname(os.path.abspath(file))), points)


def _interval(summary: dict) -> tuple[float, float] | None:
    return tuple(summary["ci95"]) if summary.get("ci95") else None


def write_tradeoff(cfg: AnnealConfig, rows: list[dict], records: list[dict], num_prompts: int,
                   compared: list[Compared]) -> str:
    order = {row["weighing"]: i for i, row in enumerate(rows)}
    ordered = sorted(records, key=lambda rec: (order[rec["weighing"]], rec["prompt_index"], rec["repeat"]))
    save_text("\n".join(json.dumps(rec) for rec in ordered), os.path.join(cfg.out, "scores.jsonl"))
    summary = {"checkpoint": cfg.checkpoint, "raw_weights": cfg.raw_weights, "num_prompts": num_prompts,
               "num_images": cfg.num_images,
               "inference_steps": cfg.inference_steps, "guidance_scale": cfg.guidance_scale, "seed": cfg.seed,
               "diversity": "mean over prompts of the mean pairwise RMS pixel difference at "
                            f"{DIVERSITY_SIDE}x{DIVERSITY_SIDE}, values in [0, 1]",
               "weighings": rows}
    utils.save_json(os.path.join(cfg.out, "tradeoff.json"), summary)
    table = markdown_table(rows, cfg.score)
    save_text(table.rstrip("\n"), os.path.join(cfg.out, "tradeoff.md"))
    for name in cfg.score:
        plots.save_png(tradeoff_plot(rows, name, compared), os.path.join(cfg.out, f"tradeoff_{name}.png"))
    return table


# ---------------------------------------------------------------------------------------------


@utils.exit_cleanly_on_usage_error
def main(cfg: AnnealConfig) -> None:
    compared = validate(cfg)
    weighings, all_prompts = weighing_names(cfg), chosen_prompts(cfg)
    dist = utils.init_distributed(cfg.device)
    generation.print_protocol(cfg)
    model, cfg = generation.load_for_inference(cfg, cfg.checkpoint, dist.device)
    setup = evaluation.MetricSetup(dist.device, rewards.parse_reward_sources(cfg.reward_source), dreamsim_cache="")
    scorers = evaluation.load_metrics(list(cfg.score), setup, dist)
    utils.ensure_writable_dir(cfg.out)

    local_records, local_diversity = render_and_score_share(cfg, model, scorers, weighings, all_prompts, dist)
    records = list(itertools.chain.from_iterable(utils.gather_objects(local_records)))
    diversities = {k: v for part in utils.gather_objects(local_diversity) for k, v in part.items()}
    if dist.is_main and cfg.score:
        rows = summarize(cfg, weighings, records, diversities, len(all_prompts))
        print(write_tradeoff(cfg, rows, records, len(all_prompts), compared), end="", flush=True)
    utils.print0(f"done: {len(records)} images of {len(weighings)} weighings in {cfg.out}")
    utils.barrier()
    utils.shutdown_distributed()


if __name__ == "__main__":
    main(utils.cli_with_presets(AnnealConfig, PRESETS, __doc__, protocols=generation.PROTOCOLS))

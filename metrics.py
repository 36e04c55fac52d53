r"""Standard evaluation: reward-model scores and DreamSim diversity of the images of the base model, a
fine-tuned checkpoint or any annealed mix of the two, generated here or read from a folder of anneal.py.

    # CPU smoke run: base and tuned images of a checkpoint of a local pipeline
    python metrics.py --checkpoint runs/smoke/checkpoints/step-0000010 --weighing base draft \
        --metrics pickscore --reward-source pickscore=path/to/clip --num-prompts 4 --num-repeats 2 \
        --inference-steps 10 --out out/metrics.json
    # the images anneal.py wrote: one row per weighing folder under out/anneal
    python metrics.py --images out/anneal --metrics pickscore dreamsim_diversity --out out/anneal-metrics.json
    # the demo world: learned and gold aesthetic, gold fidelity and diversity of base vs tuned, held-out prompts
    python metrics.py --preset demo --checkpoint runs/demo/checkpoints/step-0000100 --out runs/demo/metrics.json
    # 8 GPUs: 500 HPD v2 prompts, 4 images each
    torchrun --nproc_per_node=8 metrics.py --checkpoint runs/sd15-pickscore/checkpoints/step-0001000 \
        --metrics pickscore hpsv2 dreamsim_diversity --prompt-set hpdv2 --num-prompts 500 --num-repeats 4 \
        --out out/sd15-pickscore-hpdv2.json
    # RTDMD's stacked SD3.5 Medium LoRAs (cold start, then RL) sampled as RTDMD evaluates them (its 4-step
    # CPS sampler, T5 at 128 tokens, 1024 px: --protocol rtdmd; --protocol fdfo for FDFO's checkpoints)
    torchrun --nproc_per_node=8 metrics.py --protocol rtdmd --checkpoint cold_start/generator_ema.pt \
        rl/generator_ema.pt --prompt-set hpdv2 --num-prompts 3200 --num-repeats 4 \
        --metrics hpsv2 clip_h14 clip_l14 dreamsim_diversity --out out/rtdmd-hpdv2.json

Metrics. pickscore, hpsv2, hpsv21, aesthetic, clip_l14, clip_h14, imagereward, vlm_alignment,
vlm_quality, vlm_photo: the rewards of rewards.py, averaged over a prompt's images. dreamsim_diversity:
per prompt, the mean over the pairs of its images of the squared distance between their DreamSim
embeddings, as FDFO computes it; the embeddings are unit vectors, so this is 2 (1 - cosine similarity),
twice DreamSim's own distance.

Each metric is printed and written on the scale of the published tables it is compared with: hpsv2 and
hpsv21 as 100 x cosine (the HPSv2 benchmark's and FDFO's), the training reward being the cosine itself;
every other reward on its own scale. The JSON states each metric's convention in its `statistics` block
and keeps the values on the natural scale too (`raw`: hpsv2's cosine, DreamSim's 1 - cos).

gold_aesthetic, gold_fidelity, gold_shape, gold_diversity: the demo world's evaluator, read from
pixels with no learned part (demo_world.py); gold_diversity is the mean RMS pixel distance over pairs.

Images are scored as the 8-bit PNGs they are saved as, so generating here and scoring the folder
anneal.py wrote with the same seed give the same numbers. Image (prompt p, repeat r) starts from noise
seeded by (--seed, p, r) alone, p being the prompt's index in the whole set: 1 GPU and N GPUs agree.

Results: a table on stdout and, with --out, a JSON file with the resolved config, every prompt's
values and per metric the mean over prompts, the standard deviation (n - 1) of the per-prompt values
and the 95% Student-t confidence interval of the mean. Prompts are the independent units.
"""

import functools
import os
import re
from dataclasses import asdict, dataclass, replace
from typing import Literal

import numpy as np
import torch
from PIL import Image

import demo_world
import evaluation
import generation
import prompts as prompt_sets
import rewards
import utils
from evaluation import METRICS, ImageSet
from utils import UsageError

IMAGE_FILE = re.compile(r"img_(\d+)_(\d+)\.png")
PROMPT_FILE = re.compile(r"prompt_(\d+)\.txt")
# Settings of generation: an --images run records none of them, as none of them shaped its images.
GENERATION_FIELDS = ("checkpoint", "model", "protocol", "weighing", "prompt_set", "num_repeats", "seed",
                     "inference_steps", "guidance_scale", "eta", "scheduler", "sigmas", "resolution",
                     "max_sequence_length", "no_t5", "offload_text_encoders", "lora_alpha", "raw_weights")


@dataclass(kw_only=True)
class MetricsConfig(generation.InferenceOptions, generation.RewardSourceOption):
    # a set of defaults: "demo" evaluates the demo world (see PRESETS); other flags still override it
    preset: Literal["none", "demo"] = "none"
    # metrics: rewards (pickscore hpsv2 hpsv21 aesthetic clip_l14 clip_h14 imagereward vlm_*) and dreamsim_diversity
    metrics: tuple[str, ...] = ("pickscore",)
    # tuned weights to evaluate, applied in order: training checkpoint folders, FDFO adapter folders, RTDMD .pt
    # LoRAs (stacked: cold start, then RL); none: the base model alone
    checkpoint: tuple[str, ...] = ()
    # annealed-guidance mixes to evaluate (base, draft, linear, power_P, step_F); default draft, or base with no --checkpoint
    weighing: tuple[str, ...] = ()
    images: str | None = None  # score the images of this anneal.py folder (its --out, or one weighing in it) instead of generating
    prompt_set: str = "eval_small"  # bundled set, external set (hpdv2 pickscore_train pickscore_test) or a .txt/.json/.jsonl file
    num_prompts: int | None = None  # evaluate this many prompts spread evenly over the set; none: all of them
    num_repeats: int = 4  # images per prompt (dreamsim_diversity needs 2 or more); with --images, the folder's own
    dreamsim_cache: str = "~/.cache/dreamsim"  # DreamSim weights folder, filled on first use where github.com is reachable
    out: str | None = None  # also write the results as JSON to this file


# The demo world's evaluation: held-out prompts and seeds, the sampler settings train.py's demo preset trains
# with, the learned reward beside the gold evaluator.
PRESETS = {
    "demo": dict(metrics=("aesthetic", "gold_aesthetic", "gold_fidelity", "gold_shape", "gold_diversity"),
                 weighing=("base", "draft"), prompt_set=demo_world.EVAL_PROMPTS, num_repeats=demo_world.EVAL_IMAGES,
                 reward_source=demo_world.AESTHETIC_SOURCE, **demo_world.EVALUATION),
}


# ---------------------------------------------------------------------------------------------
# Metrics: a per-image function, loaded once, and the reduction of one prompt's images to its value


# ---------------------------------------------------------------------------------------------
# What to score: the prompts and images of each results row


def validate(cfg: MetricsConfig) -> tuple[list[str], list[ImageSet]]:
    """Everything that can be checked before loading or writing anything; returns the metric names
    and what to score with them."""
    utils.require_at_least_one(num_repeats=cfg.num_repeats,
                               num_prompts=1 if cfg.num_prompts is None else cfg.num_prompts)
    generation.validate_shared_options(cfg)
    if cfg.out is not None and os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out!r} is a folder; give the JSON file to write, e.g. {cfg.out}/metrics.json")
    names = metric_names(cfg)
    image_sets = folder_image_sets(cfg) if cfg.images is not None else generated_image_sets(cfg)
    check_repeats(image_sets, names)
    return names, image_sets


def metric_names(cfg: MetricsConfig) -> list[str]:
    names = evaluation.checked_metric_names(cfg.metrics)
    if not names:
        raise UsageError("no metric given: use e.g. --metrics pickscore hpsv2 dreamsim_diversity")
    return names


def weighing_names(cfg: MetricsConfig) -> list[str]:
    if not cfg.weighing:
        return ["draft" if cfg.checkpoint else "base"]
    names = generation.weighing_list(cfg.weighing)
    tuned = [name for name in names if name != "base"]
    if tuned and not cfg.checkpoint:
        raise UsageError(f"--weighing {tuned[0]} needs a tuned model: give --checkpoint "
                         "(without one there is only base)")
    return names


def select(indices: list[int], count: int | None, what: str) -> list[int]:
    if count is None:
        return indices
    if count > len(indices):
        raise UsageError(f"--num-prompts {count} exceeds the {len(indices)} prompts of {what}")
    return [indices[i] for i in prompt_sets.spread_indices(len(indices), count)]


def generated_image_sets(cfg: MetricsConfig) -> list[ImageSet]:
    all_prompts = prompt_sets.load_prompts(cfg.prompt_set)
    chosen = select(list(range(len(all_prompts))), cfg.num_prompts, f"prompt set {cfg.prompt_set!r}")
    prompts = {p: all_prompts[p] for p in chosen}
    return [ImageSet(name, prompts, dict.fromkeys(prompts, cfg.num_repeats)) for name in weighing_names(cfg)]


def folder_image_sets(cfg: MetricsConfig) -> list[ImageSet]:
    """The folder itself if it holds images, else each of its subfolders that does (anneal.py's weighings)."""
    if cfg.protocol != "none":
        raise UsageError(f"--images scores existing images, so --protocol {cfg.protocol}, which sets how images are "
                         "generated, has no use; drop one of the two")
    preset = PRESETS.get(cfg.preset, {})  # a preset's generation settings do not apply to existing images
    given = [utils.flag(name) for name in ("checkpoint", "model", "weighing", "raw_weights")
             if getattr(cfg, name) and getattr(cfg, name) != preset.get(name)]
    if given:
        raise UsageError(f"--images scores existing images, so {given[0]} has no use; drop one of the two")
    if not os.path.isdir(cfg.images):
        raise UsageError(f"--images {cfg.images!r} is not a folder")
    if _has_images(cfg.images):
        folders = [cfg.images]
    else:
        folders = sorted(entry.path for entry in os.scandir(cfg.images) if entry.is_dir() and _has_images(entry.path))
    if not folders:
        raise UsageError(f"--images {cfg.images!r} and its subfolders hold no img_<prompt>_<repeat>.png; "
                         "give the --out folder of anneal.py or one of its weighing folders")
    return [read_image_folder(folder, cfg.num_prompts) for folder in folders]


def _has_images(folder: str) -> bool:
    return any(IMAGE_FILE.fullmatch(name) for name in os.listdir(folder))


def read_image_folder(folder: str, num_prompts: int | None) -> ImageSet:
    """img_<p>_<r>.png with prompt_<p>.txt beside them, as anneal.py writes them."""
    images: dict[int, dict[int, str]] = {}
    texts = {}
    for name in sorted(os.listdir(folder)):
        if match := IMAGE_FILE.fullmatch(name):
            prompt, repeat = map(int, match.groups())
            images.setdefault(prompt, {})[repeat] = os.path.join(folder, name)
        elif match := PROMPT_FILE.fullmatch(name):
            texts[int(match.group(1))] = _read_prompt_file(os.path.join(folder, name))
    without_text = sorted(images.keys() - texts.keys())
    if without_text:
        raise UsageError(f"images folder {folder!r} has images of prompt {without_text[0]} but no "
                         f"prompt_{without_text[0]:05d}.txt beside them (anneal.py writes one per prompt)")
    chosen = select(sorted(images), num_prompts, f"images folder {folder!r}")
    files = {(p, k): images[p][r] for p in chosen for k, r in enumerate(sorted(images[p]))}
    return ImageSet(os.path.basename(os.path.normpath(folder)), {p: texts[p] for p in chosen},
                    {p: len(images[p]) for p in chosen}, files)


def _read_prompt_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read prompt file {path!r}: {error}") from None


def check_repeats(image_sets: list[ImageSet], names: list[str]) -> None:
    for name in names:
        needed = METRICS[name].min_repeats
        for image_set in image_sets:
            short = [p for p, count in image_set.repeats.items() if count < needed]
            if not short:
                continue
            if image_set.files is None:
                raise UsageError(f"{name} compares the images of a prompt: use --num-repeats {needed} or more, "
                                 f"got {image_set.repeats[short[0]]}")
            raise UsageError(f"{name} compares the images of a prompt and needs {needed} or more; folder "
                             f"{image_set.name!r} has {image_set.repeats[short[0]]} of prompt {short[0]}")


# ---------------------------------------------------------------------------------------------
# Images


def load_pngs(paths: list[str]) -> torch.Tensor:
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB")))
        except OSError as error:
            raise UsageError(f"cannot read image {path!r}: {error}") from None
    if len({array.shape for array in arrays}) > 1:
        raise UsageError(f"images {paths[0]!r} and {paths[-1]!r} differ in size; give images of one size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def images_for(image_set: ImageSet, batch: list[tuple[int, int]], *, cfg: MetricsConfig, model, device) -> torch.Tensor:
    if image_set.files is not None:
        return load_pngs([image_set.files[job] for job in batch]).to(device)
    return evaluation.rendered_as_saved(model, image_set, batch, generation.SamplerSettings.of(cfg), cfg.seed)


# ---------------------------------------------------------------------------------------------
# Scoring and statistics


def results_table(results: dict, names: list[str]) -> str:
    head = ["images", "prompts", *names]
    scaled = [f"{name} = {METRICS[name].scale:g} x its natural value" for name in names if METRICS[name].scale != 1]
    lines = ["mean ± half-width of its 95% confidence interval, over prompts"
             + "".join(f"; {text}" for text in scaled),
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for set_name, result in results.items():
        cells = [set_name, str(result["num_prompts"])] + [_cell(result["metrics"][name]) for name in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(summary: dict) -> str:
    if summary["ci95"] is None:
        return f"{summary['mean']:.4f}"
    return f"{summary['mean']:.4f} ± {(summary['ci95'][1] - summary['ci95'][0]) / 2:.4f}"


def resolved_config(cfg: MetricsConfig, names: list[str], image_sets: list[ImageSet]) -> dict:
    config = {**asdict(cfg), "metrics": names, "dreamsim_cache": os.path.expanduser(cfg.dreamsim_cache)}
    if cfg.images is not None:
        return {key: value for key, value in config.items() if key not in GENERATION_FIELDS}
    return {**config, "weighing": [image_set.name for image_set in image_sets],
            "num_prompts": len(image_sets[0].prompts)}


# ---------------------------------------------------------------------------------------------


@utils.exit_cleanly_on_usage_error
def main(cfg: MetricsConfig, hps_arch: str = rewards.HPS_ARCH) -> None:
    names, image_sets = validate(cfg)
    dist = utils.init_distributed(cfg.device)
    generation.print_protocol(cfg)
    dtype = generation.inference_dtype(cfg.dtype, dist.device)
    cfg = replace(cfg, dtype=str(dtype).removeprefix("torch."))
    sources = rewards.parse_reward_sources(cfg.reward_source)
    setup = evaluation.MetricSetup(dist.device, sources, cfg.dreamsim_cache, hps_arch)
    model = None
    if cfg.images is None:
        model, cfg = generation.load_for_inference(cfg, cfg.checkpoint, dist.device)
    metrics = evaluation.load_metrics(names, setup, dist)
    if cfg.out is not None and dist.is_main:  # now, not after hours of scoring
        utils.ensure_writable_dir(os.path.dirname(os.path.abspath(cfg.out)))

    images_of = functools.partial(images_for, cfg=cfg, model=model, device=dist.device)
    local = evaluation.score_share(image_sets, metrics, images_of, cfg.batch_size, dist)
    records = [record for part in utils.gather_objects(local) for record in part]
    if dist.is_main:
        results = evaluation.summarize(image_sets, names, records)
        print(results_table(results, names), end="", flush=True)
        if cfg.out is not None:
            config = resolved_config(cfg, names, image_sets)
            utils.save_json(cfg.out, {"config": config, "statistics": evaluation.statistics_block(names), "results": results})
            print(f"wrote {cfg.out}", flush=True)
    utils.barrier()
    utils.shutdown_distributed()


if __name__ == "__main__":
    main(utils.cli_with_presets(MetricsConfig, PRESETS, __doc__, protocols=generation.PROTOCOLS))

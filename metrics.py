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
    # RTDMD's stacked SD3.5 Medium LoRAs (cold start, then RL) with its 4-step CPS sampler
    torchrun --nproc_per_node=8 metrics.py --model stabilityai/stable-diffusion-3.5-medium \
        --checkpoint cold_start/generator_ema.pt rl/generator_ema.pt --sampler cps --eta 0.9 \
        --sigmas 1.0 0.9 0.75 0.5 --guidance-scale 1 --prompt-set hpdv2 --num-prompts 3200 --num-repeats 4 \
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

import contextlib
import functools
import io
import math
import os
import re
import zipfile
from dataclasses import asdict, dataclass, replace
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import demo_world
import generation
import prompts as prompt_sets
import rewards
import utils
from utils import UsageError

IMAGE_FILE = re.compile(r"img_(\d+)_(\d+)\.png")
PROMPT_FILE = re.compile(r"prompt_(\d+)\.txt")
# Settings of generation: an --images run records none of them, as none of them shaped its images.
GENERATION_FIELDS = ("checkpoint", "model", "weighing", "prompt_set", "num_repeats", "seed", "inference_steps",
                     "guidance_scale", "eta", "scheduler", "sigmas", "resolution", "max_sequence_length", "no_t5",
                     "offload_text_encoders", "lora_alpha", "raw_weights")
STATISTICS = ("per prompt: a reward is the mean over its images, a diversity the mean over pairs of its images; "
              "per metric: mean over prompts, std (n - 1) of the per-prompt values, 95% Student-t confidence "
              "interval of the mean; values on the scale `conventions` states, `raw` the same on the metric's "
              "natural scale (value / scale)")


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
                 weighing=("base", "draft"), prompt_set="demo_eval", num_repeats=4, seed=1000, inference_steps=20,
                 guidance_scale=5.0, batch_size=24, reward_source=[f"aesthetic={demo_world.DEMO_CLIP}"]),
}


# ---------------------------------------------------------------------------------------------
# Metrics: a per-image function, loaded once, and the reduction of one prompt's images to its value

PerImage = Callable[[torch.Tensor, list[str]], torch.Tensor]  # images [B,3,H,W] in [0,1], prompts -> [B] or [B, D]


@dataclass(frozen=True)
class MetricSetup:
    device: torch.device
    reward_sources: dict[str, str]
    dreamsim_cache: str
    hps_arch: str = rewards.HPS_ARCH  # open_clip architecture of hpsv2/hpsv21; only tests change it


@dataclass(frozen=True)
class MetricSpec:
    load: Callable[[MetricSetup], PerImage]
    per_prompt: Callable[[torch.Tensor], float]  # the stacked per-image values of one prompt -> its value
    min_repeats: int = 1  # images a prompt needs
    convention: str = ""  # what the value is, and whose published tables report it so
    scale: float = 1.0  # printed and written value = scale x natural value (that of the reward or package)


def load_reward_metric(name: str, setup: MetricSetup) -> PerImage:
    # float32 whatever the generation dtype: bf16 would quantise a PickScore near 21 to steps of 0.125
    reward = rewards.load_reward(name, setup.reward_sources, torch.float32, setup.device, hps_arch=setup.hps_arch)
    return lambda images, prompts: reward(images, prompts).float().cpu()


def mean_over_repeats(scores: torch.Tensor) -> float:
    return scores.double().mean().item()


def load_dreamsim(setup: MetricSetup) -> PerImage:
    """DreamSim's ensemble model through its package; it downloads its weights into the cache on first use."""
    try:
        from dreamsim import dreamsim
        from dreamsim.config import dreamsim_weights
    except ImportError:
        raise UsageError("metric dreamsim_diversity needs the dreamsim package: pip install dreamsim") from None
    cache = os.path.expanduser(setup.dreamsim_cache)
    try:
        # Its notes on stdout would mix into the results table; a download shows its own progress bar.
        with contextlib.redirect_stdout(io.StringIO()):
            model, preprocess = dreamsim(pretrained=True, device=str(setup.device), cache_dir=cache)
    except (OSError, zipfile.BadZipFile) as error:
        raise UsageError(
            f"cannot load DreamSim from {cache!r} ({_first_line(error)}); run once where github.com is reachable "
            f"(it fetches {dreamsim_weights['ensemble']} and the DINO ViT-B/16 of torch.hub into that folder), "
            "or copy such a folder here and pass --dreamsim-cache FOLDER"
        ) from None
    return dreamsim_embedder(model, preprocess, setup.device)


def dreamsim_embedder(model: torch.nn.Module, preprocess: Callable, device: torch.device) -> PerImage:
    """Images [B,3,H,W] in [0,1] -> embeddings [B, D] through a model and preprocess of the dreamsim package."""
    def embed(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        # The package's own PIL preprocessing (bicubic resize to 224), as its published numbers used.
        pixels = torch.cat([preprocess(image) for image in utils.to_pil(images)]).to(device)
        return model.embed(pixels).float().cpu()

    return embed


def mean_pairwise_cosine_distance(embeddings: torch.Tensor) -> float:
    """Mean of 1 - cos(e_i, e_j) over the pairs i < j of one prompt's image embeddings [R, D], R >= 2."""
    unit = F.normalize(embeddings.double(), dim=-1)
    first, second = torch.triu_indices(len(unit), len(unit), offset=1)
    return (1 - (unit[first] * unit[second]).sum(-1)).mean().item()


def _first_line(error: Exception) -> str:
    return (str(error).strip() or type(error).__name__).splitlines()[0]


def load_gold(score: PerImage, setup: MetricSetup) -> PerImage:
    """A demo-world gold metric, read from pixels; prompts outside the demo grammar are bad input."""
    def per_image(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        try:
            return score(images.cpu(), prompts)
        except ValueError as error:
            raise UsageError(f"gold metrics score demo-world prompts only: {error}") from None

    return per_image


def flat_pixels(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.float().flatten(1).cpu()


def mean_pairwise_rms_distance(pixels: torch.Tensor) -> float:
    """Mean over the pairs i < j of one prompt's images [R, D] of their root-mean-square pixel difference."""
    first, second = torch.triu_indices(len(pixels), len(pixels), offset=1)
    return (pixels[first].double() - pixels[second].double()).pow(2).mean(-1).sqrt().mean().item()


CLIP_SCORE = "logit_scale.exp() (100) x cosine, the CLIP score as FDFO reports it"
VLM_SCORE = "100 x sigmoid(logit Yes - logit No) of FDFO's question to the judge, as FDFO reports it"
HPS_SCORE = "100 x cosine, as the HPSv2 benchmark and FDFO report it (raw: the cosine, the reward's scale)"
# The scale of each reward as a metric, and the tables it compares with.
REWARD_CONVENTIONS = {
    "pickscore": ("logit_scale.exp() x cosine, as PickScore's model card and FDFO report it", 1.0),
    "hpsv2": (HPS_SCORE, 100.0),
    "hpsv21": (HPS_SCORE, 100.0),
    "aesthetic": ("the LAION improved-aesthetic-predictor's AVA 1-10 scale", 1.0),
    "clip_l14": (CLIP_SCORE, 1.0),
    "clip_h14": (CLIP_SCORE, 1.0),
    "imagereward": ("(mlp - 0.16717) / 1.03334, the ImageReward package's score", 1.0),
    **dict.fromkeys(rewards.VLM_QUESTIONS, (VLM_SCORE, 1.0)),
}
DREAMSIM_DIVERSITY = ("mean over pairs of a prompt's images of the squared distance between DreamSim's unit "
                      "embeddings, 2 (1 - cos), as FDFO computes it (raw: 1 - cos, DreamSim's own distance)")
GOLD = "the demo world's pixel-level evaluator (demo_world.py)"

# Every metric by name. gold_*: the demo world's evaluator (demo_world.py), computed from pixels with no
# learned part; gold_diversity is per prompt the mean RMS pixel distance over pairs of its images.
METRICS = {
    **{name: MetricSpec(functools.partial(load_reward_metric, name), mean_over_repeats,
                        convention=REWARD_CONVENTIONS[name][0], scale=REWARD_CONVENTIONS[name][1])
       for name in rewards.REWARD_NAMES},
    "dreamsim_diversity": MetricSpec(load_dreamsim, mean_pairwise_cosine_distance, min_repeats=2,
                                     convention=DREAMSIM_DIVERSITY, scale=2.0),
    "gold_aesthetic": MetricSpec(functools.partial(load_gold, demo_world.gold_aesthetic), mean_over_repeats,
                                 convention=GOLD + ": contrast x size x centring, in [0, 1]"),
    "gold_fidelity": MetricSpec(functools.partial(load_gold, demo_world.gold_fidelity), mean_over_repeats,
                                convention=GOLD + ": fraction of images with the prompted colours"),
    "gold_shape": MetricSpec(functools.partial(load_gold, demo_world.gold_shape), mean_over_repeats,
                             convention=GOLD + ": fraction of images with the prompted shape"),
    "gold_diversity": MetricSpec(functools.partial(load_gold, flat_pixels), mean_pairwise_rms_distance, min_repeats=2,
                                 convention=GOLD + ": mean RMS pixel distance over pairs, pixels in [0, 1]"),
}


def load_metrics(names: list[str], setup: MetricSetup, dist: utils.Dist) -> dict[str, PerImage]:
    """Each metric's model once per process; rank 0 first, so that only it downloads into shared caches."""
    if not dist.is_main:
        utils.barrier()
    loaded = {name: METRICS[name].load(setup) for name in names}
    if dist.is_main:
        utils.barrier()
    return loaded


# ---------------------------------------------------------------------------------------------
# What to score: the prompts and images of each results row


@dataclass
class ImageSet:
    name: str  # the weighing, or the folder's name with --images
    prompts: dict[int, str]  # prompt index in its set -> text, the selected prompts only
    repeats: dict[int, int]  # prompt index -> number of its images
    files: dict[tuple[int, int], str] | None = None  # (prompt, k-th image) -> PNG; None: generated here


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
    """Accept `a b` and `a,b` alike; each name once, in the order given."""
    names = list(dict.fromkeys(part.strip() for value in cfg.metrics for part in value.split(",") if part.strip()))
    if not names:
        raise UsageError("no metric given: use e.g. --metrics pickscore hpsv2 dreamsim_diversity")
    for name in names:
        if name not in METRICS:
            raise UsageError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
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
    given = [flag for flag, value in (("--checkpoint", cfg.checkpoint), ("--model", cfg.model),
                                      ("--weighing", cfg.weighing), ("--raw-weights", cfg.raw_weights)) if value]
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


def as_saved(images: torch.Tensor) -> torch.Tensor:
    """The values the images have once written as 8-bit PNGs (the rounding of utils.to_pil)."""
    return (images.float().clamp(0, 1) * 255).round() / 255


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
    # Drawn as anneal.py draws them, so that its folders score the same.
    return as_saved(generation.render_jobs(model, image_set.prompts, batch, generation.SamplerSettings.of(cfg),
                                           seed=cfg.seed, weighing=image_set.name))


# ---------------------------------------------------------------------------------------------
# Scoring and statistics


@torch.no_grad()
def score_share(image_sets: list[ImageSet], metrics: dict[str, PerImage], images_of, batch_size: int,
                dist: utils.Dist) -> list[tuple[str, dict]]:
    """This rank's prompts of every set, streamed through the metrics batch by batch: a prompt's
    per-image values are kept only until its last image is scored. Returns (set name, record) pairs."""
    work = [(image_set, [(p, k) for p in prompt_sets.shard(sorted(image_set.prompts), dist.rank, dist.world_size)
                         for k in range(image_set.repeats[p])]) for image_set in image_sets]
    bar = tqdm(total=sum(len(jobs) for _, jobs in work), disable=not dist.is_main, desc="metrics", dynamic_ncols=True)
    records = []
    for image_set, jobs in work:
        pending: dict[int, dict[str, list[torch.Tensor]]] = {}
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            images = images_of(image_set, batch)
            texts = [image_set.prompts[p] for p, _ in batch]
            values = {name: per_image(images, texts) for name, per_image in metrics.items()}
            for i, (p, k) in enumerate(batch):
                collected = pending.setdefault(p, {name: [] for name in metrics})
                for name in metrics:
                    collected[name].append(values[name][i])
                if k == image_set.repeats[p] - 1:
                    records.append((image_set.name, prompt_record(image_set, p, pending.pop(p))))
            bar.update(len(batch))
    bar.close()
    return records


def prompt_record(image_set: ImageSet, prompt: int, collected: dict[str, list[torch.Tensor]]) -> dict:
    values = {name: METRICS[name].scale * METRICS[name].per_prompt(torch.stack(per_image))
              for name, per_image in collected.items()}
    return {"prompt_index": prompt, "prompt": image_set.prompts[prompt], "num_images": image_set.repeats[prompt],
            **values}


@functools.lru_cache
def student_t_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom: a 95% interval's half-width factor."""
    log_scale = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(t: float) -> float:
        return math.exp(log_scale - (df + 1) / 2 * math.log1p(t * t / df))

    def mass_from_zero(x: float, steps: int = 2000) -> float:  # Simpson's rule
        h = x / steps
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, steps))
        return (density(0.0) + inner + density(x)) * h / 3

    low, high = 0.0, 20.0  # the quantile is 12.71 at df = 1 and falls towards 1.96
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if mass_from_zero(middle) < 0.475 else (low, middle)
    return (low + high) / 2


def mean_std_ci(values: list[float]) -> dict:
    count = len(values)
    mean = math.fsum(values) / count
    if count < 2:
        return {"mean": mean, "std": None, "ci95": None}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (count - 1))
    half_width = student_t_975(count - 1) * std / math.sqrt(count)
    return {"mean": mean, "std": std, "ci95": [mean - half_width, mean + half_width]}


def metric_summary(values: list[float], scale: float) -> dict:
    """The statistics of a metric's per-prompt values, and of the same on its natural scale."""
    return {**mean_std_ci(values), "raw": mean_std_ci([value / scale for value in values])}


def statistics_block(names: list[str]) -> dict:
    return {"summary": STATISTICS, "conventions": {name: {"convention": METRICS[name].convention,
                                                          "scale": METRICS[name].scale} for name in names}}


def summarize(image_sets: list[ImageSet], names: list[str], records: list[tuple[str, dict]]) -> dict:
    results = {}
    for image_set in image_sets:
        rows = sorted((record for set_name, record in records if set_name == image_set.name),
                      key=lambda record: record["prompt_index"])
        results[image_set.name] = {
            "num_prompts": len(rows),
            "metrics": {name: metric_summary([row[name] for row in rows], METRICS[name].scale) for name in names},
            "per_prompt": rows,
        }
    return results


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
    dtype = generation.inference_dtype(cfg.dtype, dist.device)
    cfg = replace(cfg, dtype=str(dtype).removeprefix("torch."))
    sources = rewards.parse_reward_sources(cfg.reward_source)
    setup = MetricSetup(dist.device, sources, cfg.dreamsim_cache, hps_arch)
    model = None
    if cfg.images is None:
        model, cfg = generation.load_for_inference(cfg, cfg.checkpoint, dist.device)
    metrics = load_metrics(names, setup, dist)
    if cfg.out is not None and dist.is_main:  # now, not after hours of scoring
        utils.ensure_writable_dir(os.path.dirname(os.path.abspath(cfg.out)))

    images_of = functools.partial(images_for, cfg=cfg, model=model, device=dist.device)
    local = score_share(image_sets, metrics, images_of, cfg.batch_size, dist)
    records = [record for part in utils.gather_objects(local) for record in part]
    if dist.is_main:
        results = summarize(image_sets, names, records)
        print(results_table(results, names), end="", flush=True)
        if cfg.out is not None:
            config = resolved_config(cfg, names, image_sets)
            utils.save_json(cfg.out, {"config": config, "statistics": statistics_block(names), "results": results})
            print(f"wrote {cfg.out}", flush=True)
    utils.barrier()
    utils.shutdown_distributed()


if __name__ == "__main__":
    main(utils.cli_with_presets(MetricsConfig, PRESETS, __doc__))

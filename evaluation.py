"""Evaluation shared by metrics.py, anneal.py and training's --val-metrics: every metric by name (a
per-image function loaded once, and the reduction of one prompt's images to its value), the scoring
of image sets prompt by prompt, and the statistics over prompts. Image (prompt p, repeat r) is drawn
as anneal.py draws it, so that every consumer scores the same images."""

import contextlib
import functools
import io
import math
import os
import zipfile
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

import demo_world
import generation
import prompts as prompt_sets
import rewards
import utils
from utils import UsageError

STATISTICS = ("per prompt: a reward is the mean over its images, a diversity the mean over pairs of its images; "
              "per metric: mean over prompts, std (n - 1) of the per-prompt values, 95% Student-t confidence "
              "interval of the mean; values on the scale `conventions` states, `raw` the same on the metric's "
              "natural scale (value / scale)")


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
    # The VLM judge scores as FDFO's evaluation does, its processor resizing the 8-bit images; the reward's
    # differentiable resize is for training.
    score = reward.rewards[name].published_scores if name in rewards.VLM_QUESTIONS else reward
    return lambda images, prompts: score(images, prompts).float().cpu()


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
    """Each metric's model once per process, in turns per node (utils.in_turns_per_node): what one downloads
    into a node's caches (DreamSim's weights) is fetched there by one process while the others wait."""
    return utils.in_turns_per_node(dist, lambda: {name: METRICS[name].load(setup) for name in names})


@dataclass
class ImageSet:
    name: str  # the weighing, or the folder's name with --images
    prompts: dict[int, str]  # prompt index in its set -> text, the selected prompts only
    repeats: dict[int, int]  # prompt index -> number of its images
    files: dict[tuple[int, int], str] | None = None  # (prompt, k-th image) -> PNG; None: generated here


def as_saved(images: torch.Tensor) -> torch.Tensor:
    """The values the images have once written as 8-bit PNGs (the rounding of utils.to_pil)."""
    return (images.float().clamp(0, 1) * 255).round() / 255


@torch.no_grad()
def score_share(image_sets: list[ImageSet], metrics: dict[str, PerImage], images_of, batch_size: int,
                dist: utils.Dist, show_bar: bool = True) -> list[tuple[str, dict]]:
    """This rank's prompts of every set, streamed through the metrics batch by batch: a prompt's
    per-image values are kept only until its last image is scored. Returns (set name, record) pairs."""
    work = [(image_set, [(p, k) for p in prompt_sets.shard(sorted(image_set.prompts), dist.rank, dist.world_size)
                         for k in range(image_set.repeats[p])]) for image_set in image_sets]
    bar = tqdm(total=sum(len(jobs) for _, jobs in work), disable=not (show_bar and dist.is_main), desc="metrics", dynamic_ncols=True)
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


def checked_metric_names(values, flag: str = "--metrics") -> list[str]:
    """Accept `a b` and `a,b` alike; each name once, in the order given."""
    names = list(dict.fromkeys(part.strip() for value in values for part in value.split(",") if part.strip()))
    for name in names:
        if name not in METRICS:
            raise UsageError(f"{flag}: unknown metric {name!r}; valid: {', '.join(METRICS)}")
    return names


def rendered_as_saved(model, image_set: "ImageSet", batch: list[generation.Job], settings: generation.SamplerSettings,
                      seed: int) -> torch.Tensor:
    """The images of `batch` generated with the set's weighing, with the values they have once saved as PNGs."""
    return as_saved(generation.render_jobs(model, image_set.prompts, batch, settings, seed=seed, weighing=image_set.name))

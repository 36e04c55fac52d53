"""Differentiable reward models for reward fine-tuning.

`load_reward("pickscore:1.0,aesthetic:0.05")` returns a frozen module; calling it with float images
[B, 3, H, W] in [0, 1] (any H, W) and B prompts returns float32 scores [B] that back-propagate to the
images. Preprocessing is done in torch on the float tensor (never through PIL) so gradients flow.

Rewards and where their weights come from (override any with `--reward-source NAME=PATH`):
- pickscore: transformers CLIPModel `yuvalkirstain/PickScore_v1`, processor of the LAION ViT-H-14;
  score = logit_scale.exp() * cosine(image, text).
- clip_l14, clip_h14: CLIP score of `openai/clip-vit-large-patch14` / the LAION ViT-H-14, same formula.
  For these three, PATH is a folder as `save_pretrained` writes it; its preprocessor_config.json and
  tokenizer files are used when present, otherwise those of the hub processor (PROCESSOR_IDS).
- hpsv2, hpsv21: open_clip ViT-H-14 with the HPSv2 / HPSv2.1 state dict; score = cosine.
  PATH is the .pt file.
- aesthetic: LAION improved-aesthetic-predictor MLP on the L2-normalised OpenAI CLIP ViT-L/14 image
  embedding; score on the AVA 1-10 scale. PATH is either a folder holding the CLIP ViT-L/14
  checkpoint and `sac+logos+ava1-l14-linearMSE.pth`, or that .pth file alone (the backbone then comes
  from `openai/clip-vit-large-patch14`).

Default sources of single files are written `owner/repo/filename` (a Hugging Face hub file).
"""

import contextlib
import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import utils
from utils import UsageError

REWARD_NAMES = ("pickscore", "hpsv2", "hpsv21", "aesthetic", "clip_l14", "clip_h14")

LAION_VIT_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_VIT_L14 = "openai/clip-vit-large-patch14"
AESTHETIC_WEIGHTS_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HPS_ARCH = "ViT-H-14"

DEFAULT_SOURCES = {
    "pickscore": "yuvalkirstain/PickScore_v1",
    "hpsv2": "xswu/HPSv2/HPS_v2_compressed.pt",
    "hpsv21": "xswu/HPSv2/HPS_v2.1_compressed.pt",
    "aesthetic": f"camenduru/improved-aesthetic-predictor/{AESTHETIC_WEIGHTS_FILE}",
    "clip_l14": OPENAI_VIT_L14,
    "clip_h14": LAION_VIT_H14,
}

# Where the tokenizer and image-processor config come from when the model source has none
# (the PickScore repo is used with the processor of the model it was fine-tuned from).
PROCESSOR_IDS = {
    "pickscore": LAION_VIT_H14,
    "clip_l14": OPENAI_VIT_L14,
    "clip_h14": LAION_VIT_H14,
    "aesthetic": OPENAI_VIT_L14,
}


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'pickscore' -> [('pickscore', 1.0)]; 'pickscore:1.0,aesthetic:0.05' -> both, in order."""
    valid = ", ".join(REWARD_NAMES)
    if not spec.strip():
        raise UsageError(f"empty reward spec; give NAME or NAME:WEIGHT,NAME:WEIGHT with NAME one of {valid}")
    parsed = []
    for entry in spec.split(","):
        name, has_weight, weight_text = (part.strip() for part in entry.partition(":"))
        if name not in REWARD_NAMES:
            raise UsageError(f"unknown reward {name!r} in reward spec {spec!r}; valid names: {valid}")
        if any(name == seen for seen, _ in parsed):
            raise UsageError(f"reward {name!r} appears twice in reward spec {spec!r}; give each reward once")
        parsed.append((name, _parse_weight(name, weight_text) if has_weight else 1.0))
    return parsed


def _parse_weight(name: str, text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise UsageError(f"weight {text!r} of reward {name!r} is not a finite number; write e.g. {name}:0.5")
    return weight


def parse_reward_sources(pairs: list[str]) -> dict[str, str]:
    """['pickscore=/models/pickscore', ...] (repeated --reward-source values) -> {name: path}."""
    sources = {}
    for pair in pairs:
        name, has_equals, path = pair.partition("=")
        if not has_equals or name not in REWARD_NAMES or not path:
            raise UsageError(
                f"bad --reward-source {pair!r}; write NAME=PATH with NAME one of {', '.join(REWARD_NAMES)}"
            )
        sources[name] = path
    return sources


def load_reward(
    spec: str,
    sources: dict[str, str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    gradient_checkpointing: bool = False,
    hps_arch: str = HPS_ARCH,
) -> "WeightedRewards":
    """The frozen, eval-mode weighted sum of the rewards in `spec`.

    `sources` maps reward names to local folders/files that replace DEFAULT_SOURCES. `hps_arch` is the
    open_clip architecture of hpsv2/hpsv21; only tests change it, to a tiny registered config.
    """
    names = parse_reward_spec(spec)
    unknown = sorted(set(sources or {}) - set(REWARD_NAMES))
    if unknown:
        valid = ", ".join(REWARD_NAMES)
        raise UsageError(f"unknown reward {unknown[0]!r} in --reward-source; valid names: {valid}")
    locations = {**DEFAULT_SOURCES, **(sources or {})}
    rewards = {
        name: _load_one(name, locations[name], dtype, gradient_checkpointing, hps_arch) for name, _ in names
    }
    return WeightedRewards(names, rewards).to(device)


def per_reward_scores(
    module: "WeightedRewards", images: torch.Tensor, prompts: list[str]
) -> dict[str, torch.Tensor]:
    """Unweighted scores [B] of each reward of a combination, for reporting them separately."""
    return {name: module.rewards[name](images, prompts) for name, _ in module.names}


class WeightedRewards(nn.Module):
    """sum(weight * reward(images, prompts)); frozen, and kept in eval mode even if .train() is called."""

    def __init__(self, names: list[tuple[str, float]], rewards: dict[str, nn.Module]):
        super().__init__()
        self.names = list(names)
        self.rewards = nn.ModuleDict(rewards)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # A caller that switches its whole model tree to training must not turn on reward dropout.
        return super().train(False)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return sum(weight * self.rewards[name](images, prompts) for name, weight in self.names)


def _load_one(name, source, dtype, gradient_checkpointing, hps_arch) -> nn.Module:
    if name in ("hpsv2", "hpsv21"):
        return _load_hps(name, source, dtype, gradient_checkpointing, hps_arch)
    if name == "aesthetic":
        return _load_aesthetic(name, source, dtype, gradient_checkpointing)
    return _load_clip_score(name, source, dtype, gradient_checkpointing)


# ---- locating checkpoints -------------------------------------------------------------------------


def _cannot_load(name: str, source: str, reason: str) -> UsageError:
    is_file = name in ("hpsv2", "hpsv21")
    local_copy = "/path/to/" + (DEFAULT_SOURCES[name].rsplit("/", 1)[1] if is_file else "folder")
    return UsageError(
        f"cannot load reward {name!r} from {source!r} ({reason}); "
        f"download it and pass --reward-source {name}={local_copy}"
    )


@contextlib.contextmanager
def _hub_errors_as_usage_errors(name: str, source: str):
    """Turn a hub or file-system failure into the one-line error the scripts print (exit status 2)."""
    try:
        yield
    except OSError as error:
        reason = "offline and not in the Hugging Face cache, or not a valid checkpoint"
        raise _cannot_load(name, source, reason) from error


def _cache_only(source: str) -> bool:
    """A hub id with the hub out of reach: load from the local cache at once instead of retrying."""
    return not os.path.exists(source) and not utils.hub_reachable()


def _check_local(name: str, source: str) -> str:
    """Expand '~'; a source spelled as a path must exist (hub ids never start with '/', '.' or '~')."""
    path = os.path.expanduser(source)
    if source.startswith(("/", ".", "~")) and not os.path.exists(path):
        raise _cannot_load(name, source, "no such file or folder")
    return path


def _fetch_file(name: str, source: str) -> str:
    """A local file path, or `owner/repo/filename` downloaded from (or found in the cache of) the hub."""
    path = _check_local(name, source)
    if os.path.isfile(path):
        return path
    repo_owner, repo_name, filename = (source.split("/", 2) + ["", ""])[:3]
    if not filename:
        raise _cannot_load(name, source, "no such file")
    from huggingface_hub import hf_hub_download

    with _hub_errors_as_usage_errors(name, source):
        return hf_hub_download(f"{repo_owner}/{repo_name}", filename, local_files_only=not utils.hub_reachable())


# ---- preprocessing in torch -----------------------------------------------------------------------


def _normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def _resize_bicubic(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # antialias=True is PIL's bicubic (a = -0.5, widened kernel when downscaling), the resampling of the
    # PIL-based processors these models were trained and evaluated with; PIL skips same-size resizes.
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)


def clip_preprocess(images: torch.Tensor, shortest_edge: int, crop: tuple[int, int], mean, std) -> torch.Tensor:
    """CLIPImageProcessor on a float tensor: shortest side to `shortest_edge`, center crop, mean/std."""
    height, width = images.shape[-2:]
    # CLIPImageProcessor truncates the long side (int, not round) and centers the crop with floor
    # division; copying both keeps our pixels on the same grid as the processor's.
    if height <= width:
        size = (shortest_edge, int(shortest_edge * width / height))
    else:
        size = (int(shortest_edge * height / width), shortest_edge)
    images = _resize_bicubic(images, size)
    top, left = (size[0] - crop[0]) // 2, (size[1] - crop[1]) // 2
    images = images[..., top : top + crop[0], left : left + crop[1]]
    return _normalize(images, mean, std)


def hps_preprocess(images: torch.Tensor, size: tuple[int, int], mean, std) -> torch.Tensor:
    """open_clip's 'longest' validation transform (HPSv2's): longest side to size, zero pad, mean/std."""
    height, width = images.shape[-2:]
    ratio = max(height / size[0], width / size[1])
    resized = (round(height / ratio), round(width / ratio))
    images = _resize_bicubic(images, resized)
    pad_height, pad_width = size[0] - resized[0], size[1] - resized[1]
    left, top = pad_width // 2, pad_height // 2
    images = F.pad(images, (left, pad_width - left, top, pad_height - top))
    return _normalize(images, mean, std)


def _checkpoint_each(layers: nn.ModuleList) -> None:
    """Recompute each layer's activations in backward.

    transformers only checkpoints modules in training mode, and rewards stay in eval mode, so the
    layers' forwards are wrapped directly.
    """
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


# ---- transformers CLIP: PickScore, CLIP score, aesthetic backbone ---------------------------------


class ClipPreprocess(nn.Module):
    """Holds a CLIPImageProcessor's settings and applies `clip_preprocess` with them."""

    def __init__(self, image_processor):
        super().__init__()
        self.shortest_edge = image_processor.size["shortest_edge"]
        self.crop = (image_processor.crop_size["height"], image_processor.crop_size["width"])
        self.mean = tuple(image_processor.image_mean)
        self.std = tuple(image_processor.image_std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return clip_preprocess(images, self.shortest_edge, self.crop, self.mean, self.std)


def _load_clip(name: str, source: str, dtype, gradient_checkpointing: bool):
    """(CLIPModel, processor) from a hub id or a `save_pretrained` folder."""
    from transformers import CLIPModel, CLIPProcessor

    path = _check_local(name, source)
    has_processor = os.path.isfile(os.path.join(path, "preprocessor_config.json"))
    processor_source = path if has_processor else PROCESSOR_IDS[name]
    with _hub_errors_as_usage_errors(name, source):
        model = CLIPModel.from_pretrained(path, dtype=dtype, local_files_only=_cache_only(path))
    with _hub_errors_as_usage_errors(name, processor_source):
        processor = CLIPProcessor.from_pretrained(processor_source, local_files_only=_cache_only(processor_source))
    if gradient_checkpointing:
        _checkpoint_each(model.vision_model.encoder.layers)
    return model, processor


class ClipScore(nn.Module):
    """logit_scale.exp() * cosine(image embedding, text embedding) of a transformers CLIPModel."""

    def __init__(self, model, processor):
        super().__init__()
        self.model = model
        self.tokenizer = processor.tokenizer
        self.preprocess = ClipPreprocess(processor.image_processor)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_embeddings = _clip_image_embeddings(self.model, self.preprocess, images)
        with torch.no_grad():
            tokens = self.tokenizer(
                prompts,
                padding="max_length",
                truncation=True,
                max_length=self.tokenizer.model_max_length,
                return_tensors="pt",
            ).to(images.device)
            text_embeddings = F.normalize(self.model.get_text_features(**tokens).pooler_output, dim=-1)
        cosine = (image_embeddings * text_embeddings).sum(-1)
        return (self.model.logit_scale.exp() * cosine).float()


def _clip_image_embeddings(model, preprocess: ClipPreprocess, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image embeddings; preprocessing runs in float32 for accuracy."""
    pixel_values = preprocess(images.float()).to(model.dtype)
    return F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)


def _load_clip_score(name: str, source: str, dtype, gradient_checkpointing: bool) -> ClipScore:
    return ClipScore(*_load_clip(name, source, dtype, gradient_checkpointing))


# ---- LAION aesthetic predictor --------------------------------------------------------------------


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head; attribute names match its weights file (layers.N.*)."""

    def __init__(self, input_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


class AestheticScore(nn.Module):
    """AVA 1-10 aesthetic score of the L2-normalised CLIP image embedding; prompts are ignored."""

    def __init__(self, model, processor, mlp: AestheticMLP):
        super().__init__()
        self.model = model
        self.preprocess = ClipPreprocess(processor.image_processor)
        self.mlp = mlp

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embeddings = _clip_image_embeddings(self.model, self.preprocess, images)
        return self.mlp(embeddings).float()


def _load_aesthetic(name: str, source: str, dtype, gradient_checkpointing: bool) -> AestheticScore:
    path = _check_local(name, source)
    if os.path.isdir(path):
        weights_file, backbone = os.path.join(path, AESTHETIC_WEIGHTS_FILE), path
        if not os.path.isfile(weights_file):
            raise _cannot_load(name, source, f"the folder has no {AESTHETIC_WEIGHTS_FILE}")
    else:
        weights_file, backbone = _fetch_file(name, source), OPENAI_VIT_L14
    model, processor = _load_clip(name, backbone, dtype, gradient_checkpointing)
    state_dict = torch.load(weights_file, map_location="cpu", weights_only=True)
    mlp = AestheticMLP(state_dict["layers.0.weight"].shape[1])
    mlp.load_state_dict(state_dict)
    return AestheticScore(model, processor, mlp.to(dtype))


# ---- HPSv2 / HPSv2.1 (open_clip) ------------------------------------------------------------------


class HPSScore(nn.Module):
    """cosine(image, text) of an open_clip model fine-tuned by HPSv2, as the HPSv2 paper reports it."""

    def __init__(self, model, tokenizer):
        super().__init__()
        import open_clip

        self.model = model
        self.tokenizer = tokenizer
        preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
        size = preprocess_cfg["size"]
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = tuple(preprocess_cfg["mean"])
        self.std = tuple(preprocess_cfg["std"])

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        pixel_values = hps_preprocess(images.float(), self.size, self.mean, self.std).to(dtype)
        image_embeddings = self.model.encode_image(pixel_values, normalize=True)
        with torch.no_grad():
            text_embeddings = self.model.encode_text(self.tokenizer(prompts).to(images.device), normalize=True)
        return (image_embeddings * text_embeddings).sum(-1).float()


def _load_hps(name: str, source: str, dtype, gradient_checkpointing: bool, arch: str) -> HPSScore:
    import open_clip

    checkpoint_file = _fetch_file(name, source)
    # pretrained=<file> makes open_clip torch.load it (weights_only, map_location cpu) and accept
    # both the {'state_dict': ...} layout of the HPS files and a bare state dict.
    with _hub_errors_as_usage_errors(name, source):
        model = open_clip.create_model(arch, pretrained=checkpoint_file, weights_only=True)
    if gradient_checkpointing:
        model.visual.set_grad_checkpointing(True)
    return HPSScore(model.to(dtype), open_clip.get_tokenizer(arch))

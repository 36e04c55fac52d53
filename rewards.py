"""Differentiable reward models for reward fine-tuning.

`load_reward("pickscore:1.0,aesthetic:0.05")` returns a frozen module; calling it with float images
[B, 3, H, W] in [0, 1] (any H, W) and B prompts returns float32 scores [B] that back-propagate to the
images. Preprocessing is done in torch on the float tensor (never through PIL) so gradients flow.

Rewards and where their weights come from (override any with `--reward-source NAME=PATH`):
- pickscore: transformers CLIPModel `yuvalkirstain/PickScore_v1`, processor of the LAION ViT-H-14;
  score = logit_scale.exp() * cosine(image, text).
- clip_l14, clip_h14: CLIP score of `openai/clip-vit-large-patch14` / the LAION ViT-H-14, same formula.
  For these three, PATH is a folder as `save_pretrained` writes it; its processor (preprocessor_config.json
  or processor_config.json, and the tokenizer files) is used, or with neither, the hub processor
  (PROCESSOR_IDS), said in a line; a folder with only one of the two is refused. Text is tokenized to
  the text model's max_position_embeddings (77 for CLIP), whatever the tokenizer records.
- hpsv2, hpsv21: open_clip ViT-H-14 with the HPSv2 / HPSv2.1 state dict; score = cosine.
  PATH is the .pt file.
- aesthetic: LAION improved-aesthetic-predictor MLP on the L2-normalised OpenAI CLIP ViT-L/14 image
  embedding; score on the AVA 1-10 scale. PATH is either a folder holding the CLIP ViT-L/14
  checkpoint and `sac+logos+ava1-l14-linearMSE.pth`, or that .pth file alone (the backbone then comes
  from `openai/clip-vit-large-patch14`).
- imagereward: `THUDM/ImageReward` (BLIP ViT-L image encoder, BERT text encoder cross-attending to
  the image, MLP head); score = (mlp - 0.16717) / 1.03334 as the official package computes it. PATH is
  a folder with `ImageReward.pt` and `med_config.json` (and the BERT tokenizer files, else those of
  `google-bert/bert-base-uncased`).
- vlm_alignment, vlm_quality, vlm_photo: `Qwen/Qwen2.5-VL-7B-Instruct` asked FDFO's yes/no questions;
  score = 100 * sigmoid(logit Yes - logit No) at the last position. PATH is a `save_pretrained` folder
  of any Qwen2.5-VL size (model and processor). One judge is loaded per process for all three.

Default sources of single files are written `owner/repo/filename` (a Hugging Face hub file).
"""

import contextlib
import functools
import json
import math
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import utils
from utils import UsageError

# FDFO's yes/no questions to the VLM judge, word for word as its evaluation asks them
# (NVlabs/finite-difference-flow-optimization, eval/calculate_metrics.py, VLM_QUESTIONS). Its training
# reward asks the alignment question without "with" ('... Answer Yes or No.', fdfo/config.py); the
# evaluation wording is the one its published figures were measured with.
VLM_QUESTIONS = {
    "vlm_alignment": 'Does this image match the caption "{prompt}"? Answer with Yes or No.',
    "vlm_quality": "Is this image of professional quality? Answer with Yes or No.",
    "vlm_photo": "Does this image look photorealistic? Answer with Yes or No.",
}

REWARD_NAMES = ("pickscore", "hpsv2", "hpsv21", "aesthetic", "clip_l14", "clip_h14", "imagereward", *VLM_QUESTIONS)

LAION_VIT_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
OPENAI_VIT_L14 = "openai/clip-vit-large-patch14"
AESTHETIC_WEIGHTS_FILE = "sac+logos+ava1-l14-linearMSE.pth"
HPS_ARCH = "ViT-H-14"
QWEN_VL_7B = "Qwen/Qwen2.5-VL-7B-Instruct"
IMAGEREWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
# BLIP's tokenizer (ImageReward/models/BLIP/blip.py, init_tokenizer); the hub repo holds no tokenizer.
BERT_BASE_UNCASED = "google-bert/bert-base-uncased"

DEFAULT_SOURCES = {
    "pickscore": "yuvalkirstain/PickScore_v1",
    "hpsv2": "xswu/HPSv2/HPS_v2_compressed.pt",
    "hpsv21": "xswu/HPSv2/HPS_v2.1_compressed.pt",
    "aesthetic": f"camenduru/improved-aesthetic-predictor/{AESTHETIC_WEIGHTS_FILE}",
    "clip_l14": OPENAI_VIT_L14,
    "clip_h14": LAION_VIT_H14,
    "imagereward": "THUDM/ImageReward",
    **dict.fromkeys(VLM_QUESTIONS, QWEN_VL_7B),
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
    device = torch.device(device)
    rewards = {
        name: _load_one(name, locations[name], dtype, device, gradient_checkpointing, hps_arch) for name, _ in names
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


def _load_one(name, source, dtype, device, gradient_checkpointing, hps_arch) -> nn.Module:
    if name in ("hpsv2", "hpsv21"):
        return _load_hps(name, source, dtype, gradient_checkpointing, hps_arch)
    if name == "aesthetic":
        return _load_aesthetic(name, source, dtype, gradient_checkpointing)
    if name == "imagereward":
        return _load_imagereward(name, source, dtype, gradient_checkpointing)
    if name in VLM_QUESTIONS:
        return _load_vlm_score(name, source, dtype, device, gradient_checkpointing)
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


def floor_half(excess: int) -> int:
    """CLIPImageProcessor's centre-crop offset: floor division."""
    return excess // 2


def round_half(excess: int) -> int:
    """torchvision CenterCrop's offset: int(round(excess / 2.0)), Python's round, so halves go to even."""
    return round(excess / 2)


def clip_preprocess(images: torch.Tensor, shortest_edge: int, crop: tuple[int, int], mean, std,
                    crop_offset=floor_half) -> torch.Tensor:
    """CLIPImageProcessor on a float tensor: shortest side to `shortest_edge`, center crop, mean/std.
    With `crop_offset=round_half` it is torchvision's Resize(shortest_edge) + CenterCrop(crop) instead."""
    height, width = images.shape[-2:]
    # Both truncate the long side (int, not round); copying that and the crop offset keeps our pixels
    # on the same grid as theirs.
    if height <= width:
        size = (shortest_edge, int(shortest_edge * width / height))
    else:
        size = (int(shortest_edge * height / width), shortest_edge)
    images = _resize_bicubic(images, size)
    top, left = crop_offset(size[0] - crop[0]), crop_offset(size[1] - crop[1])
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


# What CLIPProcessor.save_pretrained writes, then and now: the image-processor settings in
# preprocessor_config.json (older transformers) or inside processor_config.json (transformers 5), and the
# tokenizer as tokenizer.json (fast) or vocab.json + merges.txt (slow).
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def _load_clip(name: str, source: str, gradient_checkpointing: bool):
    """(CLIPModel in float32, processor) from a hub id or a `save_pretrained` folder."""
    from transformers import CLIPModel

    path = _check_local(name, source)
    # A folder's processor first, so that what it lacks is told before loading anything; a hub id's model first,
    # so that a missing one is the one named.
    processor = _clip_processor(name, source, path) if os.path.isdir(path) else None
    with _hub_errors_as_usage_errors(name, source):
        # In float32, cast by the caller: ClipScore reads the logit scale first, which bf16 would round.
        model = CLIPModel.from_pretrained(path, dtype=torch.float32, local_files_only=_cache_only(path))
    if processor is None:
        processor = _clip_processor(name, source, path)
    return checkpointed_clip(model, gradient_checkpointing), processor


def checkpointed_clip(model, gradient_checkpointing: bool):
    """A transformers CLIPModel whose vision layers recompute their activations in backward when asked."""
    if gradient_checkpointing:
        _checkpoint_each(model.vision_model.encoder.layers)
    return model


def _clip_processor(name: str, source: str, path: str):
    """The processor a folder holds (tokenizer and image processor, in any layout save_pretrained writes),
    or with neither, the hub processor of PROCESSOR_IDS, said in a line; half of one is refused."""
    from transformers import CLIPProcessor

    def holds(files):
        return any(os.path.isfile(os.path.join(path, file)) for file in files)

    parts = {"image-processor config (preprocessor_config.json or processor_config.json)": holds(IMAGE_PROCESSOR_FILES),
             "tokenizer (tokenizer.json, or vocab.json and merges.txt)": holds(TOKENIZER_FILES)}
    if all(parts.values()):
        with _hub_errors_as_usage_errors(name, source):
            return CLIPProcessor.from_pretrained(path, local_files_only=True)
    fallback = PROCESSOR_IDS[name]
    if os.path.isdir(path):
        missing = [part for part, held in parts.items() if not held]
        if len(missing) == 1:
            raise UsageError(f"cannot load reward {name!r} from {source!r}: the folder holds no {missing[0]}; save the "
                             "model's CLIPProcessor into it (save_pretrained)")
        try:
            processor = CLIPProcessor.from_pretrained(fallback, local_files_only=_cache_only(fallback))
        except OSError:
            raise UsageError(f"cannot load reward {name!r} from {source!r}: the folder holds no tokenizer nor "
                             f"image-processor config, and {fallback}'s, which would stand in, is neither cached nor "
                             "reachable; save the model's CLIPProcessor into the folder (save_pretrained)") from None
        utils.print0(f"reward {name}: {source} holds no processor; using that of {fallback}")
        return processor
    with _hub_errors_as_usage_errors(name, fallback):
        return CLIPProcessor.from_pretrained(fallback, local_files_only=_cache_only(fallback))


class ClipScore(nn.Module):
    """logit_scale.exp() * cosine(image embedding, text embedding) of a transformers CLIPModel, the scale
    and the product in float32 whatever the model's dtype: bf16 holds PickScore's logit scale 4.6052 as
    4.5938, whose exp is 99 where metrics (in float32) have 100."""

    def __init__(self, model, processor):
        super().__init__()
        # A plain float, which casting the module leaves alone: build with the model in float32, then cast.
        self.scale = model.logit_scale.detach().double().exp().item()
        self.model = model
        self.tokenizer = processor.tokenizer
        self.preprocess = ClipPreprocess(processor.image_processor)
        # CLIP's 77 positions (the tiny test models' fewer), from the model itself: a tokenizer saved without
        # model_max_length reports 1e30, and padding to that would never end.
        self.max_tokens = model.config.text_config.max_position_embeddings

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        image_embeddings = _clip_image_embeddings(self.model, self.preprocess, images)
        with torch.no_grad():
            tokens = self.tokenizer(
                prompts,
                padding="max_length",
                truncation=True,
                max_length=self.max_tokens,
                return_tensors="pt",
            ).to(images.device)
            text_embeddings = F.normalize(self.model.get_text_features(**tokens).pooler_output.float(), dim=-1)
        return self.scale * (image_embeddings * text_embeddings).sum(-1)


def _clip_image_embeddings(model, preprocess: ClipPreprocess, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image embeddings, in float32; preprocessing runs in float32 for accuracy."""
    pixel_values = preprocess(images.float()).to(model.dtype)
    return F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output.float(), dim=-1)


def _load_clip_score(name: str, source: str, dtype, gradient_checkpointing: bool) -> ClipScore:
    return ClipScore(*_load_clip(name, source, gradient_checkpointing)).to(dtype)


# ---- LAION aesthetic predictor --------------------------------------------------------------------


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head; attribute names match its weights file (layers.N.*).
    ImageReward's head is the same MLP (its ImageReward.py says it is based on that predictor's code)."""

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
        return self.mlp(embeddings.to(self.mlp.layers[0].weight.dtype)).float()


def _load_aesthetic(name: str, source: str, dtype, gradient_checkpointing: bool) -> AestheticScore:
    path = _check_local(name, source)
    if os.path.isdir(path):
        weights_file, backbone = os.path.join(path, AESTHETIC_WEIGHTS_FILE), path
        if not os.path.isfile(weights_file):
            raise _cannot_load(name, source, f"the folder has no {AESTHETIC_WEIGHTS_FILE}")
    else:
        weights_file, backbone = _fetch_file(name, source), OPENAI_VIT_L14
    model, processor = _load_clip(name, backbone, gradient_checkpointing)
    state_dict = torch.load(weights_file, map_location="cpu", weights_only=True)
    mlp = AestheticMLP(state_dict["layers.0.weight"].shape[1])
    mlp.load_state_dict(state_dict)
    return AestheticScore(model.to(dtype), processor, mlp.to(dtype))


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


# ---- ImageReward (BLIP) ---------------------------------------------------------------------------

# The official package's normalisation of the MLP output (THUDM/ImageReward, ImageReward/ImageReward.py).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_TOKENS = 35  # its tokenizer call: padding="max_length", truncation, max_length=35
# Its torchvision Normalize: the OpenAI CLIP mean and std.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BLIP_HEAD_WIDTH = 64  # BLIP's ViT-B (768 wide, 12 heads) and ViT-L (1024, 16) both use 64-wide heads
BLIP_VISION_PREFIX, BLIP_TEXT_PREFIX, HEAD_PREFIX = "blip.visual_encoder.", "blip.text_encoder.", "mlp."


class ImageRewardScore(nn.Module):
    """ImageReward: the [CLS] state of BERT cross-attending to the BLIP ViT's image tokens, through the MLP,
    normalised as the official package does."""

    def __init__(self, visual, text_encoder, mlp: AestheticMLP, tokenizer, image_size: int):
        super().__init__()
        self.visual = visual
        self.text_encoder = text_encoder
        self.mlp = mlp
        self.tokenizer = tokenizer
        self.image_size = image_size

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        # The package's transform: Resize(224, bicubic) of the shortest side, CenterCrop(224), CLIP mean/std.
        pixel_values = clip_preprocess(images.float(), self.image_size, (self.image_size,) * 2, CLIP_MEAN, CLIP_STD,
                                       crop_offset=round_half)
        image_embeddings = self.visual.forward_features(pixel_values.to(self.visual.cls_token.dtype))
        with torch.no_grad():
            tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=IMAGEREWARD_MAX_TOKENS,
                                    return_tensors="pt").to(images.device)
        # No encoder mask: the package's is all ones.
        text = self.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                 encoder_hidden_states=image_embeddings)
        return ((self.mlp(text.last_hidden_state[:, 0]) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).float()


def _imagereward_files(name: str, source: str) -> tuple[str, str, str]:
    """(ImageReward.pt, med_config.json, tokenizer source) of a local folder or a hub repo id."""
    path = _check_local(name, source)
    if not os.path.isdir(path):
        return (_fetch_file(name, f"{source}/{IMAGEREWARD_FILE}"), _fetch_file(name, f"{source}/{MED_CONFIG_FILE}"),
                BERT_BASE_UNCASED)
    files = [os.path.join(path, file) for file in (IMAGEREWARD_FILE, MED_CONFIG_FILE)]
    missing = [os.path.basename(file) for file in files if not os.path.isfile(file)]
    if missing:
        raise _cannot_load(name, source, f"the folder has no {missing[0]}")
    has_tokenizer = os.path.isfile(os.path.join(path, "vocab.txt"))
    return files[0], files[1], path if has_tokenizer else BERT_BASE_UNCASED


def _split_imagereward_weights(name: str, source: str, state_dict: dict) -> tuple[dict, dict, dict]:
    """The ViT, BERT and MLP weights of ImageReward.pt by module. Like the package's non-strict load, other
    entries (BLIP's contrastive projections) go unused."""
    vision, text, head = ({key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
                          for prefix in (BLIP_VISION_PREFIX, BLIP_TEXT_PREFIX, HEAD_PREFIX))
    if not (vision and text and head):
        raise _cannot_load(name, source, "no blip.visual_encoder / blip.text_encoder / mlp weights")
    text.pop("embeddings.position_ids", None)  # med.py's persistent buffer; BlipTextModel makes its own
    return vision, text, head


def _load_imagereward_weights(module: nn.Module, weights: dict, name: str, source: str) -> None:
    """Every weight of the module from the checkpoint, and nothing the module lacks."""
    try:
        result = module.load_state_dict(weights, strict=False)
    except RuntimeError as error:  # a shape mismatch, named on the last line of torch's message
        raise _cannot_load(name, source, f"its weights do not fit: {str(error).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        problem = f"lacks {result.missing_keys[0]!r}" if result.missing_keys else f"has {result.unexpected_keys[0]!r}"
        raise _cannot_load(name, source, f"the checkpoint {problem}, not ImageReward's layout")


def _blip_vit(weights: dict) -> nn.Module:
    """BLIP's ViT (models/BLIP/vit.py) is timm's VisionTransformer with the same parameter names; its shape
    is read from the weights (patch size, grid, width, depth, MLP width), its 64-wide heads from BLIP."""
    from timm.models.vision_transformer import VisionTransformer

    width = weights["cls_token"].shape[-1]
    patch = weights["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(weights["pos_embed"].shape[1] - 1)
    depth = len({key.split(".")[1] for key in weights if key.startswith("blocks.")})
    vit = VisionTransformer(img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth,
                            num_heads=width // BLIP_HEAD_WIDTH, mlp_ratio=weights["blocks.0.mlp.fc1.weight"].shape[0] / width,
                            qkv_bias=True, class_token=True, global_pool="", num_classes=0,
                            norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
    return vit


def _blip_text_encoder(med_config_file: str, encoder_width: int, tokenizer) -> nn.Module:
    """BLIP's med.py BertModel is transformers' BlipTextModel (same parameter names), configured from
    med_config.json; as BLIP_Pretrain does, the cross-attention width is the ViT's, not the file's."""
    from transformers import BlipTextConfig, BlipTextModel

    with open(med_config_file) as f:
        med = json.load(f)
    config = BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=encoder_width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med["hidden_act"], layer_norm_eps=med["layer_norm_eps"], pad_token_id=med["pad_token_id"],
        bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
        # BlipTextModel builds the cross-attention layers of med_config's add_cross_attention for a decoder
        # config; it attends bidirectionally all the same, since forward is called with is_decoder=False.
        is_decoder=med["add_cross_attention"],
    )
    return BlipTextModel(config, add_pooling_layer=False)


def _blip_tokenizer(name: str, source: str):
    from transformers import BertTokenizer

    with _hub_errors_as_usage_errors(name, source):
        tokenizer = BertTokenizer.from_pretrained(source, local_files_only=_cache_only(source))
    # BLIP's init_tokenizer adds these two; ImageReward's embedding table has their rows (30522, 30523).
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _load_imagereward(name: str, source: str, dtype, gradient_checkpointing: bool) -> ImageRewardScore:
    checkpoint_file, med_config_file, tokenizer_source = _imagereward_files(name, source)
    state_dict = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
    vision_weights, text_weights, head_weights = _split_imagereward_weights(name, source, state_dict)
    tokenizer = _blip_tokenizer(name, tokenizer_source)
    try:
        visual = _blip_vit(vision_weights)
        text_encoder = _blip_text_encoder(med_config_file, visual.embed_dim, tokenizer)
        mlp = AestheticMLP(head_weights["layers.0.weight"].shape[1])
    except KeyError as error:
        raise _cannot_load(name, source, f"no {error} in the checkpoint or med_config.json") from None
    for module, weights in ((visual, vision_weights), (text_encoder, text_weights), (mlp, head_weights)):
        _load_imagereward_weights(module, weights, name, source)
    if gradient_checkpointing:
        visual.set_grad_checkpointing(True)
        _checkpoint_each(text_encoder.encoder.layer)
    image_size = visual.patch_embed.img_size[0]
    return ImageRewardScore(visual.to(dtype), text_encoder.to(dtype), mlp.to(dtype), tokenizer, image_size)


# ---- VLM judge: Qwen2.5-VL asked yes/no questions (FDFO) ------------------------------------------

# Qwen2.5-VL's chat format with its default system prompt and the image before the question, as FDFO
# writes it out (eval/models.py VLM.CHAT_TEMPLATE, fdfo/rewards.py): what the model's own chat template
# makes of one user turn with an image and a text, plus the assistant header.
QWEN_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
             "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n")
VLM_ANSWERS = ("Yes", "No")


def qwen_vl_size(height: int, width: int, image_processor) -> tuple[int, int]:
    """The size Qwen2VLImageProcessor resizes an image of this size to: its smart_resize with its own patch,
    merge and pixel-count settings (512 px -> 504, 1024 px -> 1036 with the 7B judge's)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=image_processor.patch_size * image_processor.merge_size,
                        min_pixels=image_processor.size["shortest_edge"], max_pixels=image_processor.size["longest_edge"])


def resize_for_qwen_vl(images: torch.Tensor, image_processor) -> torch.Tensor:
    """Float images to the processor's own size for their resolution, bicubic and antialiased as its resize, in
    float32: the processor's resize, differentiable."""
    return _resize_bicubic(images.float(), qwen_vl_size(*images.shape[-2:], image_processor))


def qwen_vl_pixel_values(images: torch.Tensor, image_processor) -> torch.Tensor:
    """Qwen2VLImageProcessor's `pixel_values` for float images [B, 3, H, W] in [0, 1] already at its size, in
    torch: mean/std, then its patch layout, [B * grid_h * grid_w, C * frames * patch * patch]."""
    patch, merge, frames = image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
    images = _normalize(images, image_processor.image_mean, image_processor.image_std)
    batch, channels, height, width = images.shape
    rows, columns = height // (patch * merge), width // (patch * merge)
    patches = images.reshape(batch, channels, rows, merge, patch, columns, merge, patch)
    # Patches go block by block, the merge x merge neighbours that the patch merger fuses next to each other;
    # each is flattened channel-major over `frames` copies of itself (a still image is a clip of equal frames).
    patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7).unsqueeze(6)
    patches = patches.expand(-1, -1, -1, -1, -1, -1, frames, -1, -1)
    return patches.reshape(batch * rows * columns * merge**2, channels * frames * patch * patch)


class QwenJudge(nn.Module):
    """A Qwen2.5-VL model answering a yes/no question about each image: 100 * sigmoid(logit Yes - logit No)
    at the last position; differentiable w.r.t. the images as a reward, FDFO's evaluation as a metric."""

    def __init__(self, model, processor, answer_ids: tuple[int, int]):
        super().__init__()
        self.model = model
        self.processor = processor
        self.answer_ids = list(answer_ids)

    def forward(self, images: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """The reward: the processor's resize done in torch on the float images, so that gradients reach them."""
        resized = resize_for_qwen_vl(images, self.processor.image_processor)
        with torch.no_grad():
            # The processor's token ids, masks and image grid; its pixel values carry no graph, so ours replace them.
            inputs = self.processor(text=[QWEN_CHAT.format(question) for question in questions], images=resized.detach(),
                                    padding=True, images_kwargs={"do_rescale": False, "do_resize": False},
                                    return_tensors="pt").to(images.device)
        pixel_values = qwen_vl_pixel_values(resized, self.processor.image_processor)
        return self._score(inputs, pixel_values)

    @torch.no_grad()
    def published_scores(self, images: torch.Tensor, questions: list[str]) -> torch.Tensor:
        """The metric, as FDFO's evaluation computes it (eval/models.py, VLM.calc_yes_no_scores on run_pipe's
        uint8 images): the 8-bit images through the processor, which resizes them itself."""
        pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        inputs = self.processor(text=[QWEN_CHAT.format(question) for question in questions], images=pixels,
                                padding=True, return_tensors="pt").to(images.device)
        return self._score(inputs, inputs["pixel_values"])

    def _score(self, inputs, pixel_values: torch.Tensor) -> torch.Tensor:
        # Left padding puts every row's last token at the end.
        inputs = {**inputs, "pixel_values": pixel_values.to(self.model.dtype)}
        hidden = self.model.model(**inputs, use_cache=False).last_hidden_state[:, -1]
        return torch.sigmoid(self._yes_minus_no(hidden)) * 100

    def _yes_minus_no(self, hidden: torch.Tensor) -> torch.Tensor:
        """logit[Yes] - logit[No] from the Yes and No rows of the output projection alone, in float32 even
        under autocast: bf16 logits between 16 and 32 are 0.125 apart, up to 3 points of score."""
        head = self.model.get_output_embeddings()
        bias = None if head.bias is None else head.bias[self.answer_ids].float()
        with torch.autocast(hidden.device.type, enabled=False):
            yes, no = F.linear(hidden.float(), head.weight[self.answer_ids].float(), bias).unbind(-1)
        return yes - no


class VLMScore(nn.Module):
    """One of FDFO's questions (VLM_QUESTIONS) to a shared judge; the prompt goes into the alignment question."""

    def __init__(self, judge: QwenJudge, question: str):
        super().__init__()
        self.judge = judge
        self.question = question

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.judge(images, self.questions(prompts))

    def published_scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """As FDFO's evaluation scores them: metrics.py's path (QwenJudge.published_scores)."""
        return self.judge.published_scores(images, self.questions(prompts))

    def questions(self, prompts: list[str]) -> list[str]:
        return [self.question.format(prompt=prompt) for prompt in prompts]


# Judges loaded in this process, kept while a reward uses one: vlm_alignment, vlm_quality and vlm_photo
# (and metrics.py's separate loads of them) share one copy of a 7B model.
_JUDGES: "weakref.WeakValueDictionary[tuple, QwenJudge]" = weakref.WeakValueDictionary()


def _load_vlm_score(name: str, source: str, dtype, device: torch.device, gradient_checkpointing: bool) -> VLMScore:
    path = _check_local(name, source)
    # bf16 on a GPU whatever the other rewards get: FDFO trains and evaluates with a bf16 judge, and the
    # 7B judge takes 16.6 GB so (33 GB in float32).
    dtype = torch.bfloat16 if device.type == "cuda" else dtype
    key = (os.path.abspath(path) if os.path.exists(path) else source, dtype, device, gradient_checkpointing)
    judge = _JUDGES.get(key)
    if judge is None:
        judge = _JUDGES[key] = _load_judge(name, source, path, dtype, device, gradient_checkpointing)
    return VLMScore(judge, VLM_QUESTIONS[name])


def _load_judge(name: str, source: str, path: str, dtype, device: torch.device, gradient_checkpointing: bool) -> QwenJudge:
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    with _hub_errors_as_usage_errors(name, source):
        # Straight onto the device: under torchrun every rank of a node loads its own copy.
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map=str(device),
                                                                   local_files_only=_cache_only(path))
        processor = AutoProcessor.from_pretrained(path, local_files_only=_cache_only(path))
    processor.tokenizer.padding_side = "left"
    vocab = processor.tokenizer.get_vocab()
    missing = [answer for answer in VLM_ANSWERS if answer not in vocab]
    if missing:
        raise _cannot_load(name, source, f"its tokenizer has no {missing[0]!r} token to score the answer with")
    if gradient_checkpointing:
        _checkpoint_each(model.model.visual.blocks)
        _checkpoint_each(model.model.language_model.layers)
    return QwenJudge(model, processor, tuple(vocab[answer] for answer in VLM_ANSWERS))

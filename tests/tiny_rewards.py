"""Tiny reward checkpoints of the real architectures, written in the real on-disk formats.

- `make_tiny_clip`: a transformers CLIPModel folder (config.json + model.safetensors), the CLIP
  BPE tokenizer files and preprocessor_config.json, as the PickScore / OpenAI / LAION repos hold.
- `make_tiny_hps`: an open_clip ViT checkpoint saved as HPSv2 saves it ({'state_dict': ...}),
  with its architecture registered in open_clip's config registry.
- `make_tiny_aesthetic`: a tiny CLIP folder plus the LAION improved-aesthetic-predictor MLP
  weights file in that folder.

`rewards.load_reward` opens these exactly as it opens the real checkpoints.
"""

import json
import os

import torch
from torch import nn

import tiny_models

IMAGE_SIZE = 32
PROJECTION_DIM = 16
AESTHETIC_WEIGHTS_FILE = "sac+logos+ava1-l14-linearMSE.pth"

# Not the OpenAI defaults, so a loader that ignores preprocessor_config.json fails the tests.
TINY_IMAGE_MEAN = [0.5, 0.4, 0.3]
TINY_IMAGE_STD = [0.2, 0.25, 0.3]


def make_tiny_clip(folder: str, seed: int = 0) -> str:
    """A CLIPModel folder with tokenizer and image-processor config (about 60k parameters)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    torch.manual_seed(seed)
    vision_config = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    config = CLIPConfig(
        text_config=tiny_models.clip_text_config().to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=PROJECTION_DIM,
    )
    CLIPModel(config).save_pretrained(folder)
    tiny_models.write_clip_tokenizer(folder)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=TINY_IMAGE_MEAN,
        image_std=TINY_IMAGE_STD,
    ).save_pretrained(folder)
    return folder


TINY_HPS_ARCH = "tiny-hps-ViT"
TINY_HPS_CONFIG = {
    "embed_dim": PROJECTION_DIM,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    # vocab_size is that of open_clip's bundled BPE tokenizer, which the real ViT-H-14 uses too;
    # the narrow width keeps its embedding table at about 400k parameters.
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 8, "heads": 2, "layers": 2},
}


def make_tiny_hps(path: str, seed: int = 0) -> tuple[str, str]:
    """An HPSv2-format checkpoint file of a tiny open_clip ViT; returns (path, architecture name).

    The architecture is registered with open_clip under its name (a JSON config file beside the
    checkpoint), so `open_clip.create_model(name)` builds it like the built-in `ViT-H-14`.
    """
    import open_clip

    config_path = os.path.join(os.path.dirname(path), TINY_HPS_ARCH + ".json")
    with open(config_path, "w") as f:
        json.dump(TINY_HPS_CONFIG, f)
    open_clip.add_model_config(config_path)

    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_HPS_ARCH)
    torch.save({"epoch": 1, "name": "tiny-hps", "state_dict": model.state_dict()}, path)
    return path, TINY_HPS_ARCH


class LaionAestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head as LAION wrote it; its state dict is the file format."""

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

    def forward(self, embeddings):
        return self.layers(embeddings)


def make_tiny_aesthetic(folder: str, seed: int = 0) -> str:
    """A tiny CLIP folder plus the MLP weights file; the MLP input is the CLIP projection dim."""
    make_tiny_clip(folder, seed=seed)
    torch.manual_seed(seed + 1)
    torch.save(LaionAestheticMLP(PROJECTION_DIM).state_dict(), os.path.join(folder, AESTHETIC_WEIGHTS_FILE))
    return folder

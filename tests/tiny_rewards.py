"""Tiny reward checkpoints of the real architectures, written in the real on-disk formats.

- `make_tiny_clip`: a transformers CLIPModel folder (config.json + model.safetensors), the CLIP
  BPE tokenizer files and preprocessor_config.json, as the PickScore / OpenAI / LAION repos hold.
- `make_tiny_hps`: an open_clip ViT checkpoint saved as HPSv2 saves it ({'state_dict': ...}),
  with its architecture registered in open_clip's config registry.
- `make_tiny_aesthetic`: a tiny CLIP folder plus the LAION improved-aesthetic-predictor MLP
  weights file in that folder.
- `make_tiny_imagereward`: a THUDM/ImageReward folder, ImageReward.pt in the package's key layout
  with med_config.json and BERT tokenizer files.
- `make_tiny_qwen_vl`: a Qwen2.5-VL model folder with its processor (tokenizer with Yes/No tokens).

`rewards.load_reward` opens these exactly as it opens the real checkpoints.
"""

import json
import os

import torch
from tokenizers.pre_tokenizers import ByteLevel
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


# ---- ImageReward ----------------------------------------------------------------------------------

IMAGEREWARD_VIT = dict(img_size=IMAGE_SIZE, patch_size=8, embed_dim=128, depth=2, num_heads=2)  # 64-wide heads, as BLIP's
IMAGEREWARD_TEXT_LAYERS = 2
# med_config.json as THUDM/ImageReward ships it, shrunk; encoder_width is BLIP's placeholder, which
# BLIP_Pretrain overwrites with the ViT's width.
TINY_MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
    "num_hidden_layers": IMAGEREWARD_TEXT_LAYERS, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": None,
    "encoder_width": 768, "add_cross_attention": True,
}


def write_bert_tokenizer(folder: str) -> str:
    """An uncased WordPiece vocabulary of single characters (every word splits into letters), plus
    BERT's specials: the files of the bert-base-uncased repo that BertTokenizer reads."""
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters), *".,!?'\"-"]
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(tokens) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}, f)
    return folder


def imagereward_checkpoint_keys() -> set[str]:
    """The state-dict keys of ImageReward.pt for the tiny depths, written from the package's module
    definitions (THUDM/ImageReward: models/BLIP/vit.py, med.py, blip_pretrain.py, ImageReward.py), not
    from the libraries the writer below uses."""
    vit = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"]
    for block in range(IMAGEREWARD_VIT["depth"]):
        vit += [f"blocks.{block}.{part}.{kind}" for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1",
                                                             "mlp.fc2") for kind in ("weight", "bias")]
    bert = ["embeddings.position_ids", "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
            "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"]
    for layer in range(IMAGEREWARD_TEXT_LAYERS):
        parts = [f"{attention}.{part}" for attention in ("attention", "crossattention")
                 for part in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")]
        parts += ["intermediate.dense", "output.dense", "output.LayerNorm"]
        bert += [f"encoder.layer.{layer}.{part}.{kind}" for part in parts for kind in ("weight", "bias")]
    heads = [f"blip.{proj}.{kind}" for proj in ("vision_proj", "text_proj") for kind in ("weight", "bias")]
    mlp = [f"mlp.layers.{index}.{kind}" for index in (0, 2, 4, 6, 7) for kind in ("weight", "bias")]
    return {*("blip.visual_encoder." + k for k in vit), *("blip.text_encoder." + k for k in bert), *heads, *mlp}


def make_tiny_imagereward(folder: str, seed: int = 0):
    """A THUDM/ImageReward folder (ImageReward.pt, med_config.json, and the BERT tokenizer files that the
    package fetches from bert-base-uncased); returns (folder, the modules it was written from)."""
    import functools

    from timm.models.vision_transformer import VisionTransformer
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel

    os.makedirs(folder, exist_ok=True)
    tokenizer = BertTokenizer.from_pretrained(write_bert_tokenizer(folder))
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    med = {**TINY_MED_CONFIG, "vocab_size": len(tokenizer)}
    with open(os.path.join(folder, "med_config.json"), "w") as f:
        json.dump(med, f)

    torch.manual_seed(seed)
    vit = VisionTransformer(**IMAGEREWARD_VIT, qkv_bias=True, class_token=True, global_pool="", num_classes=0,
                            norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))
    text_config = BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"],
                                 encoder_hidden_size=IMAGEREWARD_VIT["embed_dim"], intermediate_size=med["intermediate_size"],
                                 num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
                                 max_position_embeddings=med["max_position_embeddings"], bos_token_id=tokenizer.bos_token_id,
                                 sep_token_id=tokenizer.sep_token_id, is_decoder=True)
    text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
    mlp = LaionAestheticMLP(med["hidden_size"])
    projections = {f"blip.{name}.{kind}": value for name, width in (("vision_proj", vit.embed_dim), ("text_proj", med["hidden_size"]))
                   for kind, value in nn.Linear(width, 8).state_dict().items()}
    state_dict = {
        **{"blip.visual_encoder." + k: v for k, v in vit.state_dict().items()},
        # med.py registers position_ids as a persistent buffer, so the real file holds it.
        "blip.text_encoder.embeddings.position_ids": torch.arange(med["max_position_embeddings"]).expand(1, -1),
        **{"blip.text_encoder." + k: v for k, v in text_encoder.state_dict().items()},
        **projections,
        **{"mlp." + k: v for k, v in mlp.state_dict().items()},
    }
    torch.save(state_dict, os.path.join(folder, "ImageReward.pt"))
    return folder, (vit.eval(), text_encoder.eval(), mlp.eval(), tokenizer)


# ---- Qwen2.5-VL judge -----------------------------------------------------------------------------

QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>"]


def qwen_tokenizer():
    """A byte-level BPE Qwen2Tokenizer: the byte alphabet, merges that make 'Yes' and 'No' single tokens as
    in the real vocabulary, and the chat and vision special tokens."""
    from transformers import Qwen2Tokenizer

    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}
    merges = [("Y", "e"), ("Ye", "s"), ("N", "o")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=QWEN_SPECIAL_TOKENS[1:])


def make_tiny_qwen_vl(folder: str, seed: int = 0) -> str:
    """A Qwen2_5_VLForConditionalGeneration folder with its processor (about 120k parameters), as
    `save_pretrained` writes the Qwen/Qwen2.5-VL-*-Instruct repos."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tokenizer = qwen_tokenizer()
    ids = dict(zip(QWEN_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS)))
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        # The real layout: 14 px patches, 2 x 2 merging, 2 frames; one windowed and one full-attention block.
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           window_size=56, fullatt_block_indexes=[1], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    image_processor = Qwen2VLImageProcessor(image_mean=TINY_IMAGE_MEAN, image_std=TINY_IMAGE_STD)
    Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                        video_processor=Qwen2VLVideoProcessor()).save_pretrained(folder)
    return folder

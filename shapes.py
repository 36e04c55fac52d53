"""The real models' architectures without their weights: the published configurations shipped in configs/real
(one folder per pipeline, laid out as the hub's, configs only; the reward backbones in configs/real/rewards),
built on any device with random weights or none. On the meta device they cost nothing and give the parameter
counts the memory model (memory.py) starts from; on a GPU bench.py runs them at the real shapes."""

import contextlib
import json
import os

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
REAL_CONFIGS = os.path.join(ROOT, "configs", "real")
REWARD_CONFIGS = os.path.join(REAL_CONFIGS, "rewards")
PUBLISHED_COUNTS = os.path.join(REAL_CONFIGS, "parameter_counts.json")


def real_models() -> list[str]:
    """The pipelines shipped in configs/real, by folder name (sd15, sdxl, ...)."""
    return sorted(name for name in os.listdir(REAL_CONFIGS)
                  if os.path.isfile(os.path.join(REAL_CONFIGS, name, "model_index.json")))


def model_folder(model: str) -> str:
    """A shipped model's folder, or `model` itself where it is a pipeline folder (a tiny test model)."""
    return model if os.path.isdir(model) else os.path.join(REAL_CONFIGS, model)


def model_index(folder: str) -> dict:
    with open(os.path.join(folder, "model_index.json")) as f:
        return json.load(f)


def pipeline_class_name(folder: str) -> str:
    """What the family is read from, as models.detect_family reads it from a real checkpoint."""
    return model_index(folder)["_class_name"]


def networks(folder: str) -> dict[str, tuple[str, str]]:
    """The pipeline's networks (components with a config.json in the folder): name -> (library, class name).
    Schedulers, tokenizers and the SD 1.5 safety checker (left out when training) have none here."""
    return {name: tuple(entry) for name, entry in model_index(folder).items()
            if isinstance(entry, list) and entry[0] is not None
            and os.path.isfile(os.path.join(folder, name, "config.json"))}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters made in `dtype` from the start: a 12B network built in fp32 and cast afterwards would need
    twice its bf16 memory on the way."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_network(folder: str, name: str, device: torch.device | str = "meta",
                  dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Component `name` of the pipeline folder from its config alone, its weights made on `device` (the meta
    device makes none), randomly initialised, in `dtype`."""
    library, class_name = networks(folder)[name]
    path = os.path.join(folder, name)
    with torch.device(device), default_dtype(dtype):
        if library == "diffusers":
            import diffusers

            cls = getattr(diffusers, class_name)
            return cls.from_config(cls.load_config(path))
        return build_transformers_model(path, class_name)


META_ATTENTION = "meta_sdpa"  # transformers' attention on the meta device, as SDPA without a mask (below)


def meta_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention on the meta device: the same call of scaled_dot_product_attention, whose
    output has the shape of the real one, without the mask, which computes nothing on meta (SDPA's own
    integration reads the mask's values to take a shortcut, which meta tensors have not; eager attention would
    make the attention matrix that no fused kernel makes)."""
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value,
                                                              enable_gqa=key.shape[1] != query.shape[1])
    return output.transpose(1, 2).contiguous(), None


def register_meta_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(META_ATTENTION, meta_attention)
    AttentionMaskInterface.register(META_ATTENTION, lambda *args, **kwargs: None)


def build_transformers_model(path: str, class_name: str | None = None) -> torch.nn.Module:
    """A transformers model from the config.json in `path` (its first architecture unless named), under the
    caller's device and default dtype; on the meta device with SDPA's attention as meta_attention makes it."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    if torch.get_default_device().type == "meta":
        register_meta_attention()
        config._attn_implementation = META_ATTENTION
    cls = getattr(transformers, class_name or config.architectures[0])
    return cls(config)


def build_reward_backbone(name: str, device: torch.device | str = "meta", dtype: torch.dtype = torch.float32):
    """A reward model's network from configs/real/rewards/<name>: PickScore's CLIP-H and the Qwen2.5-VL judge
    through transformers, HPSv2's ViT-H-14 through open_clip (its own model config format)."""
    path = os.path.join(REWARD_CONFIGS, name)
    with torch.device(device), default_dtype(dtype):
        if os.path.isfile(os.path.join(path, "open_clip_config.json")):
            import open_clip

            with open(os.path.join(path, "open_clip_config.json")) as f:
                return open_clip.CLIP(**json.load(f))
        return build_transformers_model(path)


def reward_backbones() -> list[str]:
    return sorted(os.listdir(REWARD_CONFIGS))


def parameter_count(module: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings once), as the published counts give them."""
    return sum(p.numel() for p in module.parameters())


def network_parameter_counts(model: str) -> dict[str, int]:
    """Every network of a pipeline folder, built on the meta device, by component name."""
    folder = model_folder(model)
    return {name: parameter_count(build_network(folder, name)) for name in networks(folder)}


def published_counts() -> dict[str, dict[str, int]]:
    """The published parameter counts (configs/real/README.md says where each is published)."""
    with open(PUBLISHED_COUNTS) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Stand-in tokenizers: the token count of a prompt, not its vocabulary, shapes the networks' inputs


def write_clip_tokenizer(folder: str, max_length: int) -> str:
    """A byte-level CLIP BPE tokenizer with no merges: every word splits into characters, padded to
    `max_length` tokens as the real one pads to 77.

    Written as vocab.json + merges.txt + tokenizer_config.json, the files of the real SD/CLIP
    tokenizer folders, so `CLIPTokenizer.from_pretrained(folder)` loads it the same way.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    os.makedirs(folder, exist_ok=True)
    chars = sorted(ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": max_length, "tokenizer_class": "CLIPTokenizer"}, f)
    return folder


def write_t5_tokenizer(folder: str) -> str:
    """A real T5 (Unigram) tokenizer with one piece per lowercase letter, with and without the word
    boundary mark, saved as the tokenizer.json + tokenizer_config.json of SD3's tokenizer_3 folder."""
    from transformers import T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
             + [(c, -3.0) for c in letters] + [("\u2581" + c, -3.5) for c in letters])
    T5TokenizerFast(vocab=vocab, extra_ids=0).save_pretrained(folder)
    return folder


# Qwen3's chat template, cut to what Flux2KleinPipeline asks of it: one user turn, the generation prompt,
# and the empty thinking block that `enable_thinking=False` adds.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def write_qwen_tokenizer(folder: str) -> str:
    """A Qwen2-style byte-level BPE with no merges (one token per byte), Qwen's special tokens and the chat
    template, saved as the tokenizer folder of FLUX.2 [klein] (Qwen2TokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2TokenizerFast

    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=specials)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    tokenizer.model_max_length = 131072
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Whole pipelines and rewards with random weights, for time and memory at the real shapes


def stand_in_tokenizers(folder: str, workdir: str) -> dict:
    """A tokenizer for each tokenizer component of the pipeline that pads to the real one's length (CLIP: its
    text encoder's positions; T5, Qwen: the length the pipeline call asks for)."""
    from transformers import CLIPTokenizer, Qwen2TokenizerFast, T5TokenizerFast

    tokenizers = {}
    for name, (_, class_name) in model_index_entries(folder).items():
        if not name.startswith("tokenizer"):
            continue
        target = os.path.join(workdir, name)
        if class_name == "CLIPTokenizer":
            encoder = os.path.join(folder, name.replace("tokenizer", "text_encoder"), "config.json")
            with open(encoder) as f:
                length = json.load(f)["max_position_embeddings"]
            tokenizers[name] = CLIPTokenizer.from_pretrained(write_clip_tokenizer(target, length))
        elif class_name in ("T5Tokenizer", "T5TokenizerFast"):
            tokenizers[name] = T5TokenizerFast.from_pretrained(write_t5_tokenizer(target))
        elif class_name in ("Qwen2Tokenizer", "Qwen2TokenizerFast"):
            tokenizers[name] = Qwen2TokenizerFast.from_pretrained(write_qwen_tokenizer(target))
        else:
            raise ValueError(f"no stand-in for the {class_name} of {folder}")
    return tokenizers


def model_index_entries(folder: str) -> dict[str, tuple[str | None, str | None]]:
    return {name: tuple(entry) for name, entry in model_index(folder).items() if isinstance(entry, list)}


def build_pipeline(model: str, device: torch.device | str, dtype: torch.dtype, workdir: str, **pipeline_kwargs):
    """The diffusers pipeline of a shipped model (or any pipeline folder's configs) with random weights made on
    `device` in `dtype`, stand-in tokenizers, and its own scheduler; components without a config (SD 1.5's
    safety checker) are left out, as training leaves them."""
    import diffusers

    folder = model_folder(model)
    components = {name: None for name in model_index_entries(folder)}
    components.update(stand_in_tokenizers(folder, workdir))
    components.update({name: build_network(folder, name, device, dtype) for name in networks(folder)})
    scheduler_class = getattr(diffusers, model_index_entries(folder)["scheduler"][1])
    components["scheduler"] = scheduler_class.from_config(scheduler_class.load_config(os.path.join(folder, "scheduler")))
    for network in networks(folder):
        components[network].eval()
    return getattr(diffusers, pipeline_class_name(folder))(**{**components, **pipeline_kwargs})


def random_weights_loader(workdir: str):
    """models.load_model's counterpart for training.build: the pipeline built from its configs with random
    weights directly on the device, in the dtype asked for."""
    import models

    def load(model: str, device: torch.device, dtype: torch.dtype = torch.float32, scheduler: str | None = None,
             text=None, denoiser_dtype: torch.dtype | None = None, denoiser_device: torch.device | None = None):
        family = models.detect_family(model)
        text = text or models.TextEncoding()
        pipe = build_pipeline(model, "cpu" if text.offload else device, dtype, workdir, **family.load_kwargs)
        if denoiser_dtype:
            getattr(pipe, family.denoiser_name).to(denoiser_dtype)
        if not text.t5:
            for name in family.t5_components:
                setattr(pipe, name, None)
        return models.prepared(pipe, family, device, scheduler or family.defaults["scheduler"], text, denoiser_device)

    return load


def random_pickscore_loader(workdir: str, backbone: str = "pickscore"):
    """rewards.load_reward's counterpart for training.build: PickScore's CLIP-H with random weights (or, for
    tests, another CLIPModel config folder), built on the device in the dtype asked for."""
    import rewards
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    def load(spec: str, sources=None, dtype: torch.dtype = torch.float32, device="cpu", gradient_checkpointing=False):
        path = backbone if os.path.isdir(backbone) else os.path.join(REWARD_CONFIGS, backbone)
        with torch.device(device), default_dtype(dtype):
            network = build_transformers_model(path).eval()
        side = network.config.vision_config.image_size
        processor = CLIPProcessor(
            image_processor=CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
            tokenizer=CLIPTokenizer.from_pretrained(write_clip_tokenizer(
                os.path.join(workdir, "reward_tokenizer"), network.config.text_config.max_position_embeddings)))
        score = rewards.ClipScore(rewards.checkpointed_clip(network, gradient_checkpointing), processor)
        return rewards.WeightedRewards([("pickscore", 1.0)], {"pickscore": score}).to(device)

    return load

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


def build_transformers_model(path: str, class_name: str | None = None) -> torch.nn.Module:
    """A transformers model from the config.json in `path` (its first architecture unless named), under the
    caller's device and default dtype."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
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

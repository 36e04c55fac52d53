"""Prompt sets: the bundled files in prompt_sets/, named public sets fetched once into
prompt_sets/external/, a user's txt/json/jsonl file, an even selection of N prompts, and rank sharding."""

import json
import os
import sys
import urllib.request
from dataclasses import dataclass

from utils import UsageError, write_atomic_file

PROMPT_SETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompt_sets")
EXTERNAL_DIR = os.path.join(PROMPT_SETS_DIR, "external")
DOWNLOAD_TIMEOUT_S = 60


@dataclass(frozen=True)
class ExternalSet:
    base_url: str
    files: tuple[str, ...]  # fetched from base_url + file; the set is their prompts, in this order


EXTERNAL_SETS = {
    # The HPD v2 benchmark prompts (HPSv2 paper), 800 per style; hpsv2.benchmark_prompts() reads the same files.
    "hpdv2": ExternalSet("https://huggingface.co/datasets/zhwang/HPDv2/resolve/main/benchmark/",
                         ("anime.json", "concept-art.json", "paintings.json", "photo.json")),
    # Pick-a-Pic prompts as split by Flow-GRPO for PickScore training and evaluation.
    "pickscore_train": ExternalSet("https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/pickscore/",
                                   ("train.txt",)),
    "pickscore_test": ExternalSet("https://raw.githubusercontent.com/yifan123/flow_grpo/main/dataset/pickscore/",
                                  ("test.txt",)),
}


def bundled_sets() -> list[str]:
    return sorted(name[:-4] for name in os.listdir(PROMPT_SETS_DIR) if name.endswith(".txt"))


def load_prompts(source: str) -> list[str]:
    """A bundled set by name, a named external set, or a file: .txt (one per line), .json (a list of
    strings, or of objects with a `prompt` or `caption` field), .jsonl (one such object per line).
    Blank prompts are skipped; an empty result is an error."""
    if os.path.isfile(source):  # not a folder: `demo` is both a bundled set and the demo world's weights folder
        return _read_checked(source)
    if source in bundled_sets():
        return _read_checked(os.path.join(PROMPT_SETS_DIR, source + ".txt"))
    if source in EXTERNAL_SETS:
        return [prompt for path in _fetched_files(source) for prompt in _read_checked(path)]
    raise UsageError(
        f"prompt set {source!r} is neither a file nor a bundled set ({', '.join(bundled_sets())}) "
        f"nor an external one ({', '.join(EXTERNAL_SETS)})"
    )


def _fetched_files(name: str) -> list[str]:
    """The set's files in the cache, downloading those that are missing."""
    spec, folder = EXTERNAL_SETS[name], os.path.join(EXTERNAL_DIR, name)
    paths = [os.path.join(folder, file) for file in spec.files]
    for file, path in zip(spec.files, paths):
        if os.path.isfile(path):
            continue
        try:
            _download(spec.base_url + file, path)
        except OSError as error:
            reason = getattr(error, "reason", None) or error.strerror or error
            missing = [f for f, p in zip(spec.files, paths) if not os.path.isfile(p)]
            raise UsageError(
                f"prompt set {name!r} is not downloaded and fetching it failed ({reason}); "
                f"download {', '.join(missing)} from {spec.base_url} into {folder}{os.sep}"
            ) from None
    return paths


def _download(url: str, path: str) -> None:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
        content = response.read()
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(content)

    # Several ranks may fetch at once: each writes its own temporary file and renames it into place.
    write_atomic_file(path, write)
    print(f"downloaded {url} to {path}", file=sys.stderr, flush=True)


def _read_checked(path: str) -> list[str]:
    try:
        prompts = _read(path)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UsageError(f"cannot read prompts from {path!r}: {error}") from None
    if not prompts:
        raise UsageError(f"prompt file {path!r} holds no prompts")
    return prompts


def _read(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            texts = [_prompt_of(json.loads(line), f"line {number}") for number, line in enumerate(f, 1) if line.strip()]
        elif path.endswith(".json"):
            items = json.load(f)
            if not isinstance(items, list):
                raise ValueError("a .json prompt file must hold a list")
            texts = [_prompt_of(item, f"item {number}") for number, item in enumerate(items, 1)]
        else:
            texts = f.read().splitlines()
    return [text.strip() for text in texts if text.strip()]


def _prompt_of(item, where: str) -> str:
    """A prompt string, or an object's `prompt` or `caption` field."""
    if isinstance(item, str):
        return item
    for field in ("prompt", "caption"):
        if isinstance(item, dict) and isinstance(item.get(field), str):
            return item[field]
    raise ValueError(f"{where} is neither a string nor an object with a 'prompt' or 'caption' string")


def spread_indices(total: int, count: int) -> list[int]:
    """`count` distinct indices spread evenly over range(total), the first being 0.

    Sets stored by category (HPD v2's four styles) keep every category in proportion, and the choice
    depends on nothing but the two numbers, so every rank and world size picks the same prompts.
    """
    if not 1 <= count <= total:
        raise ValueError(f"cannot pick {count} of {total} items")
    return [i * total // count for i in range(count)]


def shard(items: list, rank: int, world_size: int) -> list:
    """Rank r takes items r, r + W, r + 2W ...: deterministic, and the union is all items."""
    return items[rank::world_size]

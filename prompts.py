"""Prompt sets: the bundled files in prompt_sets/, a user's txt/json/jsonl file, and rank sharding."""

import json
import os

from utils import UsageError

PROMPT_SETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompt_sets")


def bundled_sets() -> list[str]:
    return sorted(name[:-4] for name in os.listdir(PROMPT_SETS_DIR) if name.endswith(".txt"))


def load_prompts(source: str) -> list[str]:
    """A bundled set by name, or a file: .txt (one per line), .json (a list), .jsonl (`prompt` or
    `caption` field). Blank lines are skipped; an empty result is an error."""
    path = source
    if not os.path.exists(path):
        if source not in bundled_sets():
            raise UsageError(
                f"prompt set {source!r} is neither a file nor a bundled set ({', '.join(bundled_sets())})"
            )
        path = os.path.join(PROMPT_SETS_DIR, source + ".txt")
    try:
        prompts = _read(path)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"cannot read prompts from {path!r}: {error}") from None
    if not prompts:
        raise UsageError(f"prompt file {path!r} holds no prompts")
    return prompts


def _read(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
            return [str(row["prompt"] if "prompt" in row else row["caption"]).strip() for row in rows]
        if path.endswith(".json"):
            items = json.load(f)
            if not isinstance(items, list):
                raise ValueError("a .json prompt file must hold a list of strings")
            return [str(item).strip() for item in items if str(item).strip()]
        return [line.strip() for line in f if line.strip()]


def shard(items: list, rank: int, world_size: int) -> list:
    """Rank r takes items r, r + W, r + 2W ...: deterministic, and the union is all items."""
    return items[rank::world_size]

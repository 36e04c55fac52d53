"""prompts.py: bundled sets, the txt/json/jsonl loaders, named external sets offline and fetched from a
local HTTP server, the even selection of N prompts, and rank sharding."""

import functools
import http.server
import json
import os
import re
import threading

import pytest

import prompts
from utils import UsageError

UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: the connection is refused at once


@pytest.mark.parametrize("name", ["animals", "eval_small"])
def test_bundled_sets_load_by_name(name):
    loaded = prompts.load_prompts(name)
    assert name in prompts.bundled_sets()
    assert len(loaded) >= 30 and len(set(loaded)) == len(loaded)
    assert all(prompt == prompt.strip() and prompt for prompt in loaded)


@pytest.mark.parametrize("filename, content", [
    ("p.txt", "a cat\n\n  a dog  \n"),
    ("p.json", json.dumps(["a cat", " ", {"prompt": "a dog"}])),
    ("p.jsonl", '{"prompt": "a cat"}\n\n{"caption": "a dog", "id": 3}\n'),
])
def test_user_files_in_each_format(tmp_path, filename, content):
    path = tmp_path / filename
    path.write_text(content)
    assert prompts.load_prompts(str(path)) == ["a cat", "a dog"]


@pytest.mark.parametrize("filename, content, message", [
    ("empty.txt", "\n \n", "holds no prompts"),
    ("bad.jsonl", '{"prompt": "a cat"}\n{"text": "a dog"}\n', "line 2 is neither"),
    ("bad.json", '{"prompt": "a cat"}', "must hold a list"),
    ("broken.json", '["a cat",', "cannot read prompts"),
])
def test_bad_files_are_one_line_usage_errors(tmp_path, filename, content, message):
    path = tmp_path / filename
    path.write_text(content)
    with pytest.raises(UsageError, match=message) as error:
        prompts.load_prompts(str(path))
    assert "\n" not in str(error.value)


def test_unknown_set_names_the_valid_ones():
    with pytest.raises(UsageError) as error:
        prompts.load_prompts("no_such_set")
    for name in ["animals", "eval_small", "hpdv2", "pickscore_train", "pickscore_test"]:
        assert name in str(error.value)


@pytest.fixture
def external_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(prompts, "EXTERNAL_DIR", str(tmp_path / "external"))
    return tmp_path / "external"


def point_set_at(monkeypatch, name, base_url):
    monkeypatch.setitem(prompts.EXTERNAL_SETS, name, prompts.ExternalSet(base_url, prompts.EXTERNAL_SETS[name].files))


def test_external_set_offline_says_where_to_put_the_file_and_loads_it_from_there(external_cache, monkeypatch):
    point_set_at(monkeypatch, "pickscore_test", UNREACHABLE)
    with pytest.raises(UsageError) as error:
        prompts.load_prompts("pickscore_test")
    message = str(error.value)
    assert "\n" not in message and "refused" in message
    match = re.search(r"download (\S+) from (\S+) into (\S+)$", message)
    assert match and match.group(1) == "test.txt" and match.group(2) == UNREACHABLE
    folder = match.group(3)
    assert folder.startswith(str(external_cache))

    os.makedirs(folder)
    with open(os.path.join(folder, "test.txt"), "w") as f:
        f.write("a cat on a mat\na dog in the fog\n")
    assert prompts.load_prompts("pickscore_test") == ["a cat on a mat", "a dog in the fog"]


def test_hpdv2_offline_lists_its_four_style_files(external_cache, monkeypatch):
    point_set_at(monkeypatch, "hpdv2", UNREACHABLE)
    with pytest.raises(UsageError, match="download anime.json, concept-art.json, paintings.json, photo.json from"):
        prompts.load_prompts("hpdv2")


@pytest.fixture
def http_server(tmp_path):
    """A file server on the loopback interface, standing in for the sets' public hosts."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_external_set_is_fetched_once_then_read_from_the_cache(external_cache, monkeypatch, http_server):
    root, url = http_server
    styles = ["anime", "concept-art", "paintings", "photo"]
    for style in styles:
        (root / f"{style}.json").write_text(json.dumps([f"{style} {i}" for i in range(3)]))
    point_set_at(monkeypatch, "hpdv2", url)

    fetched = prompts.load_prompts("hpdv2")
    assert fetched == [f"{style} {i}" for style in styles for i in range(3)]
    assert sorted(os.listdir(external_cache / "hpdv2")) == sorted(f"{style}.json" for style in styles)

    point_set_at(monkeypatch, "hpdv2", UNREACHABLE)
    assert prompts.load_prompts("hpdv2") == fetched


def test_spread_indices_cover_every_category_of_a_sorted_set():
    categories = [c for c in "ABCD" for _ in range(800)]
    picked = prompts.spread_indices(len(categories), 500)
    assert len(set(picked)) == 500 and picked[0] == 0 and picked == sorted(picked)
    assert {c: [categories[i] for i in picked].count(c) for c in "ABCD"} == {c: 125 for c in "ABCD"}
    assert prompts.spread_indices(7, 7) == list(range(7))
    with pytest.raises(ValueError):
        prompts.spread_indices(3, 4)


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shards_partition_the_selection_whatever_the_world_size(world_size):
    selection = prompts.spread_indices(45, 10)
    shards = [prompts.shard(selection, rank, world_size) for rank in range(world_size)]
    assert sorted(i for part in shards for i in part) == selection
    assert sum(len(part) for part in shards) == len(selection)

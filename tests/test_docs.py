"""The documentation holds: every command it shows for our scripts parses as written (the flags exist,
their values have the right types and choices), its relative links lead to files and headings that
exist, and the README stays the short front door."""

import glob
import os
import re
import shlex

import pytest
import tyro

import anneal
import bench
import build_demo_world
import demo_world
import does_it_work
import generate
import metrics
import train
import utils
from conftest import ROOT

PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]
# script -> (config class, presets or None for a script without them): how its __main__ parses its command line
SCRIPTS = {
    "train.py": (train.TrainConfig, train.PRESETS),
    "anneal.py": (anneal.AnnealConfig, anneal.PRESETS),
    "generate.py": (generate.GenerateConfig, generate.PRESETS),
    "metrics.py": (metrics.MetricsConfig, metrics.PRESETS),
    "bench.py": (bench.BenchConfig, None),
    "does_it_work.py": (does_it_work.ExperimentConfig, None),
    "build_demo_world.py": (build_demo_world.BuildConfig, None),
}


def code_blocks(text: str) -> list[str]:
    """Indented (4 spaces) and fenced code blocks, continuation lines joined."""
    blocks, current, fenced = [], [], False
    for line in text.splitlines():
        if line.startswith("```"):
            if fenced:
                blocks.append("\n".join(current))
                current = []
            fenced = not fenced
        elif fenced:
            current.append(line)
        elif line.startswith("    ") and (current or not line.strip().startswith("-")):
            current.append(line[4:])
        elif current and line.strip():
            blocks.append("\n".join(current))
            current = []
    blocks.append("\n".join(current))
    return [block.replace("\\\n", " ") for block in blocks if block.strip()]


def script_invocations(block: str) -> list[tuple[str, list[str]]]:
    """(script, args) of each command of ours in a shell block, with the block's own VAR=... expanded, and
    a loop variable (`for NAME in A B; do`) as its first value."""
    variables, found = {}, []
    for line in block.splitlines():
        for name, first in re.findall(r"\bfor (\w+) in ([^\s;]+)", line):
            variables[name] = first
        assignment = re.fullmatch(r"([A-Z_]+)=(.*)", line.strip())
        for name, value in variables.items():
            line = line.replace(f"${name}", value)
        if assignment:
            variables[assignment[1]] = " ".join(shlex.split(line.split("=", 1)[1]))
            continue
        try:
            line_words = shlex.split(line, comments=True)
        except ValueError:  # not shell (a block of Python, say)
            continue
        commands = [[]]
        for word in line_words:
            if word == "&&":
                commands.append([])
            else:
                commands[-1].append(word)
        for words in commands:
            scripts = [i for i, word in enumerate(words) if word in SCRIPTS]
            if words and re.search(r"(^|/)(python3?|torchrun)$", words[0]) and scripts:
                args = words[scripts[0] + 1:]
                # a redirection or pipe: what follows is the shell's, not the script's
                redirected = [i for i, word in enumerate(args) if re.match(r"\d?[<>|]", word)]
                found.append((words[scripts[0]], args[:redirected[0]] if redirected else args))
    return found


def documented_commands() -> list[tuple[str, str, list[str]]]:
    commands = []
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as f:
            for block in code_blocks(f.read()):
                commands += [(page, script, args) for script, args in script_invocations(block)]
    return commands


COMMANDS = documented_commands()


def test_the_pages_show_the_commands_of_every_script():
    assert {script for _, script, _ in COMMANDS} == set(SCRIPTS)
    readme = [(script, args) for page, script, args in COMMANDS if page == "README.md"]
    assert ("train.py", ["--preset", "demo"]) in readme  # the install-and-run command
    assert ("metrics.py", ["--preset", "demo", "--checkpoint", "runs/demo/checkpoints/step-0000100"]) in readme


@pytest.mark.parametrize("page, script, args", COMMANDS, ids=[f"{p}:{s}:{' '.join(a)[:60]}" for p, s, a in COMMANDS])
def test_documented_command_parses(page, script, args, capsys):
    config_class, presets = SCRIPTS[script]
    try:
        cfg = (utils.cli_with_presets(config_class, presets, "", args=args) if presets is not None
               else tyro.cli(config_class, args=args))
    except SystemExit:
        pytest.fail(f"{page}: `{script} {' '.join(args)}` does not parse:\n{capsys.readouterr().err[-2000:]}")
    if "demo" in args and "--preset" in args:  # a demo-world command runs on the committed demo model
        assert cfg.model == demo_world.DEMO_SD


def heading_anchors(path: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    with open(path) as f:
        headings = [line.lstrip("#").strip() for line in f if line.startswith("#")]
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_lead_to_files_and_headings(page):
    with open(os.path.join(ROOT, page)) as f:
        targets = re.findall(r"\]\(([^)\s]+)\)", f.read())
    broken = []
    for target in (t for t in targets if not re.match(r"[a-z]+://", t)):
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
        if not os.path.exists(full) or (anchor and anchor not in heading_anchors(full)):
            broken.append(target)
    assert not broken


def test_readme_is_the_short_front_door_with_the_test_command_ci_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert len(readme.splitlines()) <= 250
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci_test_command = f.read().strip().splitlines()[-1]
    assert f"\n    .venv/bin/pip install -r requirements-test.txt && {ci_test_command}\n" in readme
    for page in PAGES[1:]:  # every docs page is linked from it
        assert f"({page})" in readme, page

"""Nodes that share no filesystem: two single-process "nodes" (RANK 0 and 1, LOCAL_RANK 0 on both, as on
two machines), each started with the same command in a working directory of its own, so that a relative
--run-dir (or --model) is a different folder on each. Rank 0 decides and reads, every rank follows."""

import os
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
from safetensors.torch import load_file

import models
import tiny_models
import training
from conftest import ROOT
from test_train import RUN_FLAGS, assert_same_weights

NODE_TIMEOUT = 300  # seconds: ranks that disagree on what to do hang in a collective; fail instead


@dataclass
class NodeResult:
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_nodes(args: list[str], cwds: list, script: str = os.path.join(ROOT, "train.py"),
              local_ranks: list[int] | None = None) -> list[NodeResult]:
    """One process per entry of `cwds`, rank = its index, as torchrun would start them on separate machines."""
    port, processes, outputs = free_port(), [], []
    for rank, cwd in enumerate(cwds):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": str(len(cwds)),
               "LOCAL_RANK": str(local_ranks[rank] if local_ranks else 0), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        out, err = (open(os.path.join(cwd, f"rank{rank}.{name}"), "w+") for name in ("out", "err"))
        outputs.append((out, err))
        processes.append(subprocess.Popen([sys.executable, script, *args], cwd=cwd, env=env, stdout=out, stderr=err,
                                          text=True))
    results = []
    try:
        for process in processes:
            process.wait(timeout=NODE_TIMEOUT)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, (out, err) in zip(processes, outputs):
        out.seek(0), err.seek(0)
        results.append(NodeResult(process.returncode, out.read(), err.read()))
        out.close(), err.close()
        os.remove(out.name), os.remove(err.name)
    return results


def node_dirs(tmp_path, name: str, separate: bool) -> list:
    """Two working directories (one per node), or the same one twice (a shared run dir)."""
    folders = [tmp_path / name / "node0", tmp_path / name / "node1"] if separate else [tmp_path / name] * 2
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    return folders


def node_args(model, tiny_clip, prompt_file, *extra) -> list[str]:
    return ["--model", str(model), "--reward-source", f"pickscore={tiny_clip}", "--prompts", prompt_file,
            "--run-dir", "run", *RUN_FLAGS, "--batch-size", "1", "--save-every", "2", *extra]


def succeeded(results: list[NodeResult]) -> None:
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}: {result.stderr[-3000:]}"


@pytest.mark.slow
def test_a_restart_on_nodes_that_share_nothing_resumes_as_on_a_shared_run_dir(tiny_sd, tiny_clip, prompt_file,
                                                                              tmp_path):
    args = node_args(tiny_sd, tiny_clip, prompt_file, "--ema-decay", "0.5")
    finals = {}
    for name, separate in (("shared", False), ("separate", True)):
        cwds = node_dirs(tmp_path, name, separate)
        succeeded(run_nodes(args + ["--steps", "2"], cwds))
        results = run_nodes(args + ["--steps", "4"], cwds)
        succeeded(results)
        assert "resuming from run/checkpoints/step-0000002 (step 2)" in results[0].stdout
        checkpoint = cwds[0] / "run" / "checkpoints" / "step-0000004"
        finals[name] = [load_file(os.path.join(folder, models.LORA_FILE))
                        for folder in (checkpoint, checkpoint / models.EMA_DIR)]
        if separate:  # rank 1 read and wrote nothing of its own: rank 0 read the checkpoint for it
            assert not (cwds[1] / "run").exists()
    for shared, separate in zip(finals["shared"], finals["separate"]):
        assert_same_weights(separate, shared, atol=0.0)


@pytest.mark.slow
def test_nodes_with_different_model_folders_stop_at_the_first_checkpoint_naming_the_odd_rank(
        tiny_sd, tiny_clip, prompt_file, tmp_path):
    # A relative --model: each node loads its own copy, and node 1's is another model (a stale copy). The
    # gradients are all-reduced, so each full fine-tune keeps the weights it started from apart.
    cwds = node_dirs(tmp_path, "models", separate=True)
    os.symlink(tiny_sd, cwds[0] / "model")
    tiny_models.make_tiny_sd(str(cwds[1] / "model"), seed=1)
    results = run_nodes(node_args("model", tiny_clip, prompt_file, "--full-finetune", "--steps", "2",
                                  "--save-every", "1"), cwds)
    for rank, result in enumerate(results):
        assert result.returncode == 1, f"rank {rank}: {result.stderr[-3000:]}"
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 or rank == 0, result.stderr  # rank 0's progress bar comes before it
        assert lines[-1].startswith("error: training stopped: the replicas' weights disagree at step 1: rank 1 holds "
                                    "other weights"), lines[-1]
        assert lines[-1].endswith("last good checkpoint: none yet"), lines[-1]
    assert not (cwds[0] / "run" / "checkpoints").exists() or not os.listdir(cwds[0] / "run" / "checkpoints")


def test_the_odd_ranks_are_those_outside_the_largest_agreeing_group():
    assert training.disagreeing_ranks(["a", "a"]) == []
    assert training.disagreeing_ranks(["a", "b"]) == [1]  # a tie: rank 0's weights are the reference
    assert training.disagreeing_ranks(["a", "a", "b", "a"]) == [2]
    assert training.disagreeing_ranks(["b", "a", "a", "a"]) == [0]
    assert training.disagreeing_ranks(["a", "b", "b", "c"]) == [0, 3]


@pytest.mark.slow
def test_fsdp_on_nodes_that_do_not_share_the_run_dir_is_refused_before_loading(tiny_sd, tiny_clip, prompt_file,
                                                                               tmp_path):
    cwds = node_dirs(tmp_path, "fsdp", separate=True)
    results = run_nodes(node_args(tiny_sd, tiny_clip, prompt_file, "--full-finetune", "--fsdp", "--steps", "1"), cwds)
    for rank, result in enumerate(results):
        assert result.returncode == 2, f"rank {rank}: {result.stderr[-3000:]}"
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --run-dir 'run' is not shared: rank 1 cannot see"), \
            result.stderr
    assert not any((cwd / "run").exists() for cwd in cwds)  # the probe's run dir is gone again


TURNS = textwrap.dedent("""\
    import os, sys, time
    sys.path.insert(0, {root!r})
    import utils

    dist = utils.init_distributed("cpu")

    def load():
        # as a download into the node's home would: note the start, take a while, note the end
        with open("turns.log", "a") as f:
            f.write(f"start {{dist.rank}} {{time.monotonic()}}\\n")
        time.sleep(0.5)
        with open("turns.log", "a") as f:
            f.write(f"end {{dist.rank}} {{time.monotonic()}}\\n")
        return dist.rank

    assert utils.in_turns_per_node(dist, load) == dist.rank
    utils.shutdown_distributed()
""")


def test_per_node_loading_runs_on_each_nodes_local_rank_0_while_the_others_wait(tmp_path):
    # Two nodes of two processes each: ranks 0, 1 on node 0 and ranks 2, 3 on node 1, each node its own folder.
    script = tmp_path / "turns.py"
    script.write_text(TURNS.format(root=ROOT))
    nodes = node_dirs(tmp_path, "home", separate=True)
    results = run_nodes([], [nodes[0], nodes[0], nodes[1], nodes[1]], script=str(script), local_ranks=[0, 1, 0, 1])
    succeeded(results)
    spans = {}
    for node in nodes:
        for line in (node / "turns.log").read_text().splitlines():
            what, rank, when = line.split()
            spans.setdefault(int(rank), {})[what] = float(when)
    assert sorted(spans) == [0, 1, 2, 3]
    # each node's local rank 0 has finished before the node's other process starts: one at a time per folder
    assert spans[0]["end"] <= spans[1]["start"] and spans[2]["end"] <= spans[3]["start"]
    # rank 0 goes first, alone, so that nodes sharing their home fetch once
    assert spans[0]["end"] <= spans[2]["start"]


def test_require_run_dir_lock_refuses_an_unlockable_run_dir_before_loading(tiny_sd, tiny_clip, prompt_file, tmp_path,
                                                                           monkeypatch, capsys):
    import tyro

    import train
    from test_utils import unlockable

    unlockable(monkeypatch)
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # an existing run dir is held before anything loads
    args = node_args(tiny_sd, tiny_clip, prompt_file, "--steps", "1", "--require-run-dir-lock")
    args[args.index("--run-dir") + 1] = str(run_dir)
    with pytest.raises(SystemExit) as stopped:
        train.main(tyro.cli(training.TrainConfig, args=args))
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "cannot be locked on its filesystem" in lines[0], lines
    assert not os.listdir(run_dir)

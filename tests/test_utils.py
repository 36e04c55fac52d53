"""utils.py: collectives only on devices the backend serves, NaN-proof flags, the run-dir lock, the log."""

import ast
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

import utils
from conftest import ROOT
from utils import UsageError


@pytest.fixture
def process_group(tmp_path):
    """A one-process group on the given backend string; the collective helpers run as with many."""
    def start(backend: str):
        dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    yield start
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_cpu_tensor_under_a_cuda_only_backend_is_named_at_the_call(process_group):
    # "cuda:gloo" serves CUDA tensors only, as NCCL does: the way a multi-GPU run sees a CPU tensor.
    process_group("cuda:gloo")
    with pytest.raises(RuntimeError, match="got a cpu tensor, but the process group serves cuda only"):
        utils.all_reduce_mean_([torch.ones(3)])


def test_a_group_serving_both_device_types_reduces_cpu_tensors(process_group):
    process_group("cpu:gloo,cuda:gloo")
    values = [torch.tensor([1.0, 3.0]), torch.tensor([2.0], dtype=torch.float64)]
    utils.all_reduce_mean_(values)
    assert values[0].tolist() == [1.0, 3.0] and values[1].tolist() == [2.0]


def project_files() -> list[str]:
    return [os.path.join(ROOT, name) for name in sorted(os.listdir(ROOT)) if name.endswith(".py")]


def test_every_collective_goes_through_the_checked_helpers_of_utils():
    """Raw torch.distributed collectives elsewhere would skip the served-device check."""
    collectives = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "reduce_scatter", "gather",
                   "scatter", "reduce", "all_to_all", "broadcast_object_list"}
    offenders = []
    for path in project_files():
        if os.path.basename(path) == "utils.py":
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in collectives and isinstance(node.value, ast.Name) \
                    and node.value.id in ("dist", "torch.distributed"):
                offenders.append(f"{os.path.basename(path)}:{node.lineno} {node.attr}")
    assert not offenders, offenders


@dataclass
class Flags:
    scale: float = 1.0
    pair: tuple[float, float] = (0.0, 1.0)
    count: int = 3


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_float_flags_reject_nan_and_infinity(value):
    utils.require_finite(Flags())
    with pytest.raises(UsageError, match="--scale must be a finite number"):
        utils.require_finite(Flags(scale=value))
    with pytest.raises(UsageError, match="--pair must be a finite number"):
        utils.require_finite(Flags(pair=(0.0, value)))


def test_the_run_dir_lock_is_exclusive_and_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); import utils, time; "
                               f"h = utils.hold_run_dir({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UsageError, match=rf"in use by a training \(pid {holder.pid} on "):
            utils.hold_run_dir(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    utils.hold_run_dir(str(tmp_path)).close()  # free again once the holder is gone


def test_drop_after_keeps_each_step_up_to_the_checkpoint(tmp_path):
    log = utils.JsonlLog(str(tmp_path / "log.jsonl"))
    for step in (1, 2, 3):
        log.write({"step": step, "loss": float(step)})
    log.drop_after(2)
    log.write({"step": 3, "loss": 30.0})
    with open(log.path) as f:
        assert [json.loads(line) for line in f] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
                                                    {"step": 3, "loss": 30.0}]


def unlockable(monkeypatch):
    """flock as on NFS without a lock manager or Lustre without its flock option (no such filesystem can be
    mounted here): the call itself fails."""
    import errno
    import fcntl

    def flock(*args):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", flock)


def test_a_run_dir_that_cannot_be_locked_warns_in_one_line_and_goes_on(tmp_path, monkeypatch, capsys):
    unlockable(monkeypatch)
    assert utils.hold_run_dir(str(tmp_path)) is None
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: --run-dir {str(tmp_path)!r} cannot be locked on its "
                                                   "filesystem (No locks available)"), lines
    assert "--require-run-dir-lock refuses instead" in lines[0]
    assert not os.listdir(tmp_path)  # no lock file that locks nothing


def test_require_run_dir_lock_refuses_a_run_dir_that_cannot_be_locked(tmp_path, monkeypatch):
    unlockable(monkeypatch)
    with pytest.raises(UsageError, match="cannot be locked on its filesystem .No locks available., so nothing would "
                                         "stop a second training .*; use a run dir on a filesystem with flock"):
        utils.hold_run_dir(str(tmp_path), required=True)
    assert not os.listdir(tmp_path)

import os
import subprocess
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path[:0] = [ROOT, TESTS]

import tiny_flux2  # noqa: E402
import tiny_models  # noqa: E402
import tiny_rewards  # noqa: E402


def run_train(args, *, world_size=1, check=True, env=None, **popen):
    """train.py in a subprocess from the repository root, under torchrun with `world_size` > 1, one torch thread
    per process (tiny models gain nothing from more; on 2 shared cores they only contend). Given `popen`
    arguments it starts the run and returns the process, its output discarded (nothing reads it while it
    runs); otherwise it waits, asserts the run succeeded unless `check` is false, and returns the result."""
    launcher = [sys.executable]
    if world_size > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
    command = [*launcher, "train.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if popen:
        return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                **popen)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return tiny_models.make_tiny_sd(str(tmp_path_factory.mktemp("sd_eps")), "epsilon")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    return tiny_models.make_tiny_sd(str(tmp_path_factory.mktemp("sd_v")), "v_prediction", seed=1)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return tiny_models.make_tiny_sdxl(str(tmp_path_factory.mktemp("sdxl")))


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    return tiny_models.make_tiny_sd3(str(tmp_path_factory.mktemp("sd3")))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """FLUX.1-dev-like: guidance embedded."""
    return tiny_models.make_tiny_flux(str(tmp_path_factory.mktemp("flux_dev")))


@pytest.fixture(scope="session")
def tiny_klein(tmp_path_factory):
    """FLUX.2 [klein] base: real CFG."""
    return tiny_flux2.make_tiny_flux2(str(tmp_path_factory.mktemp("klein_base")))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine threads only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny CLIP in the transformers format: the PickScore and CLIP-score rewards load it."""
    return tiny_rewards.make_tiny_clip(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\na blue square\na green triangle\na yellow star\n")
    return str(path)

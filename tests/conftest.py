import os
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
sys.path[:0] = [ROOT, TESTS]

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    return tiny_models.make_tiny_sd(str(tmp_path_factory.mktemp("sd_eps")), "epsilon")


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    return tiny_models.make_tiny_sd(str(tmp_path_factory.mktemp("sd_v")), "v_prediction", seed=1)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine threads only contend."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

import os
import sys

import pytest

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

"""Shared test set-up: hypothesis profiles (ci by default, `HYPOTHESIS_PROFILE=thorough` for
deep runs) and deterministic torch."""

import os

import gin
import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# tiny test models run fastest single-threaded (2 threads contend on a shared 2-core box)
torch.set_num_threads(1)

# One session-wide local Slurm cluster for every test module that asks for it (a fixture imported
# into two modules would be two fixtures, and the second cluster would find the ports taken).
from slurm_cluster import slurm_cluster  # noqa: E402, F401


@pytest.fixture
def clean_gin():
    """gin's global config cleared before and after a test, for modules that parse or bind it
    (`pytestmark = pytest.mark.usefixtures("clean_gin")`)."""
    gin.clear_config()
    yield
    gin.clear_config()

"""Shared fixtures: small models, and one local RPC cluster per test session."""

import os

import pytest

# Two cores: keep every library's pool to them before anything imports tvm or torch.
for _name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_name, "2")

from workbench.model import UNetSpec, reference_unet  # noqa: E402

SMALL_SPEC = UNetSpec(widths=(4, 8, 16), in_channels=3, classes=2, height=32, width=48)


@pytest.fixture(scope="session")
def small_model():
    return reference_unet(SMALL_SPEC, seed=3)


@pytest.fixture(scope="session")
def cluster():
    from workbench.rpc import LocalCluster

    with LocalCluster(threads=2) as running:
        yield running


@pytest.fixture(scope="session")
def device(cluster):
    return cluster.device()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so a fixture can tell a failed test at teardown."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report

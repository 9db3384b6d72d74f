import os
import random
import zlib

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL's trainers report usage to the Hub; tests stay on loopback


def _run_seed() -> int:
    return int(os.environ.get("PF_TEST_SEED", random.SystemRandom().randrange(2**31)))


RUN_SEED = _run_seed()


def pytest_report_header(config):
    return f"peft-federated random inputs: PF_TEST_SEED={RUN_SEED} (set it to reproduce a run)"


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded freshly each run (PF_TEST_SEED reproduces one) and per test."""
    return torch.Generator().manual_seed(RUN_SEED + zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request) -> torch.dtype:
    return request.param


def tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-11}

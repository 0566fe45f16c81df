"""What every test folder shares: the repository root, `dstk` run as a user runs it, and a one-rank
torch.distributed world for in-process tests.

Nothing heavy is imported here: the data_checks tests run where torch is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANK_VARIABLES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: this process's, without the rank variables that a one-rank
    world set up inside pytest leaves (a child would think a launcher started it), and with the
    checkout's code first on the path."""
    env = {key: value for key, value in os.environ.items() if key not in RANK_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, **extra}


def run_dstk(*args: object, cwd: Path = ROOT, timeout: float = 600, env: dict | None = None,
             ) -> subprocess.CompletedProcess:
    """``dstk ARGS`` in a fresh process (this Python, the checkout's code), output captured."""
    environ = user_env(**(env or {}))
    return subprocess.run([sys.executable, "-m", "toolkit.cli", *map(str, args)], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def dstk():
    """:func:`run_dstk`, for tests that take it as a fixture."""
    return run_dstk


@pytest.fixture(scope="session")
def one_rank_world():
    """A one-rank gloo process group in this process (a PipelineModule or ZeRO engine needs one)."""
    import deepspeed
    import torch.distributed as dist

    from toolkit.launching.launcher import free_port

    if not dist.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        deepspeed.init_distributed(dist_backend="gloo")
    return dist

"""A one-rank torch.distributed world for in-process pipeline tests (PipelineModule needs one)."""

from __future__ import annotations

import os

import pytest

from toolkit.launcher import free_port


@pytest.fixture(scope="session")
def one_rank_world():
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        deepspeed.init_distributed(dist_backend="gloo")
    return dist

"""DeepSpeed's blocking sums and gathers, routed through shared memory, give gloo's exact answers.

Training layouts that run over the routing are checked against one rank in test_zero_parity.py.
"""

from pathlib import Path

import pytest

from tests.multirank import run_deepspeed
from toolkit.training.shm_collectives import usable_cores

WORKER = Path(__file__).parent / "workers" / "shm_collectives.py"


@pytest.fixture(scope="module")
def ranks():
    if usable_cores() < 2:
        pytest.skip("the routing needs a core per rank")
    return run_deepspeed(WORKER)


def test_routed_collectives_are_exact(ranks):
    for rank in ranks:
        assert rank["routed"] and rank["again"] and not rank["off"] and rank["on_again"]
        assert rank["exact"] == {key: True for key in rank["exact"]} and len(rank["exact"]) == 14


def test_routed_calls_skip_gloo_and_the_rest_keep_it(ranks):
    for rank in ranks:
        assert rank["routed_calls"] == 0
        assert rank["on_gloo"] == ["all_reduce"] * 5  # int64, max, async, strided, switched off

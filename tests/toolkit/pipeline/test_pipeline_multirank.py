"""Two real DeepSpeed ranks, one pipeline stage each, every supported family in one launch.

The worker (``pipeline_worker.py``) trains each family's tiny model both unsplit and as a 2-stage
pipeline on the same batches; these tests read what each rank reported.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.multirank import run_deepspeed
from tests.toolkit.pipeline.pipeline_worker import CASES, CLIP, STEPS

WORKER = Path(__file__).with_name("pipeline_worker.py")
CASE_NAMES = [f"{family}-{'tied' if tie else 'untied'}" for family, tie, *_ in CASES]


@pytest.fixture(scope="module")
def reports() -> list[dict]:
    """What each rank reported, by rank."""
    return run_deepspeed(WORKER, nproc=2, timeout=400)


@pytest.fixture(scope="module")
def ranks(reports) -> list[dict[str, dict]]:
    """Per rank: case name -> that rank's report."""
    return [{case["case"]: case for case in rank["cases"]} for rank in reports]


def test_cases_cover_every_family_tied_and_untied():
    families = {family for family, *_ in CASES}
    assert families == {"llama", "mistral", "qwen2", "gemma", "phi", "gpt_neox", "gpt2", "opt"}
    assert {tie for _, tie, *_ in CASES} == {True, False}


@pytest.mark.parametrize("case", CASE_NAMES)
def test_two_stage_losses_match_the_unsplit_model(ranks, case):
    for rank in ranks:
        report = rank[case]
        assert len(report["losses"]) == STEPS
        assert report["losses"] == pytest.approx(report["expected"], rel=1e-5)
        # the comparison covers DeepSpeed's gradient clipping only if it clipped
        assert min(report["reference_grad_norms"]) > CLIP


@pytest.mark.parametrize("case", CASE_NAMES)
def test_each_rank_holds_its_stage_and_about_half_the_parameters(ranks, case):
    for stage, rank in enumerate(ranks):
        report = rank[case]
        if stage == 0:
            print(report["split"])  # shown with -s: the per-stage layers and parameter counts
        assert report["stage"] == stage
        assert report["local_params"] == report["planned_params"]
        assert 0.4 < report["local_params"] / report["total_params"] < 0.6


@pytest.mark.parametrize("case", CASE_NAMES)
def test_consolidated_checkpoint_reloads_with_the_pipeline_logits_and_tie(ranks, case):
    report = ranks[0][case]
    assert report["final_logits_max_diff"] < 1e-5
    assert report["final_tied"] == case.endswith("-tied")


def test_resumed_pipeline_continues_exactly_as_an_uninterrupted_one(reports):
    for rank in reports:
        resume = rank["resume"]
        assert resume["resumed"] == pytest.approx(resume["uninterrupted"], rel=1e-6)
        assert resume["uninterrupted"][2] != resume["uninterrupted"][0]  # it trained

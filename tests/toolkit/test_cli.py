"""The `dstk` command line describes itself: version, help texts, and the run report's wording."""

from __future__ import annotations

from tests.conftest import run_dstk
from toolkit.training.report import rows


def test_version_and_help_speak_to_a_user():
    assert run_dstk("--version").stdout.strip().startswith("dstk ")
    top = run_dstk("--help").stdout
    assert "Fine-tune Hugging Face causal LMs" in top and "dispatcher" not in top and "--verbose" in top
    assert "Print the versions of dstk" in run_dstk("env", "--help").stdout
    assert "recipe key" in run_dstk("train", "--help").stdout


def test_the_held_out_count_says_which_records_were_not_scored():
    """53 of 64 held-out records scored: the other 11 had no response left within train.seq_len."""
    score = {"loss": 1.0, "response_match": 0.5, "records": 53, "truncated": 11}
    run = {"parallel": {"zero_stage": 1, "nproc": 2, "parameters": {"trainable": 10, "total": 10}},
           "audit": {"verdict": "pass"}, "result": {"eval_before": score, "eval_after": score}}
    found = dict(rows(run, []))
    assert found["response match"] == ("50.0% -> 50.0% (53 held-out records; 11 more have no response "
                                       "within train.seq_len)")

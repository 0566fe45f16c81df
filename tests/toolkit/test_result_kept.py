"""Nothing of a finished training is lost to a failure after its last step: if final/ cannot be
written the last checkpoint stays and converts offline; if that checkpoint cannot be saved, final/
is written from memory. Either way the run says so in one line and exits 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import ROOT, run_dstk, user_env

PROBE = torch.arange(24).view(2, 12) * 7 % 90 + 5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("kept")
    done = subprocess.run([sys.executable, str(ROOT / "tests/toolkit/workers/result_kept.py"), str(out)],
                          cwd=out, env=user_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads((out / "outcomes.json").read_text())


def _logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(input_ids=PROBE).logits


def test_a_failed_final_keeps_the_checkpoint_which_converts_to_the_trained_model(runs):
    out, outcomes = runs
    error = outcomes["no_final"]["error"]
    assert outcomes["no_final"]["exit_code"] == 1
    assert "training finished and the checkpoint of step 6 is saved, but writing final/ failed" in error
    assert f"dstk checkpoints convert {out / 'no_final'}" in error
    run = json.loads((out / "no_final" / "run.json").read_text())
    assert run["status"] == "trained" and "No space left on device" in run["error"]
    done = run_dstk("checkpoints", "convert", out / "no_final", "-o", out / "converted", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(_logits(out / "converted"), _logits(out / "whole" / "final"), rtol=1e-5, atol=1e-5)


def test_a_failed_last_checkpoint_writes_final_from_memory(runs):
    out, outcomes = runs
    error = outcomes["no_checkpoint"]["error"]
    assert "the checkpoint of step 6 could not be saved (OSError: Input/output error)" in error
    assert "final/ holds the trained model, written from memory" in error
    torch.testing.assert_close(_logits(out / "no_checkpoint" / "final"), _logits(out / "whole" / "final"),
                               rtol=1e-5, atol=1e-5)
    saved = sorted(p.name for p in (out / "no_checkpoint" / "checkpoints").glob("step_*"))
    assert saved == ["step_000003"]  # the last complete one stays


def test_the_summary_says_where_the_model_is(runs, tmp_path):
    """`dstk train` on a run whose final/ failed: the console's last line points at the fix."""
    out, _ = runs
    import contextlib
    import io

    from toolkit.recipe import load_recipe
    from toolkit.training.report import print_run_summary

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        print_run_summary(load_recipe(out / "no_final" / "recipe.yaml"), 1)
    assert "training finished, but" in err.getvalue() and "dstk checkpoints convert" in err.getvalue()

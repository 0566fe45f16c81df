"""`dstk verify`: a layout against its single-rank reference, on a real run and on crafted metrics."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from toolkit.errors import UserError
from toolkit.recipe import load_recipe
from toolkit.training.parity import compare, reference_of


def _lines(losses, norms):
    return [{"step": i + 1, "loss": loss, "grad_norm": norm} for i, (loss, norm) in enumerate(zip(losses, norms))]


def test_matching_runs_pass_and_a_drifting_one_fails():
    same = compare(_lines([3.0, 2.5], [1.0, 0.9]), _lines([3.0, 2.5 * (1 + 1e-7)], [1.0, 0.9]), tolerance=1e-5)
    assert same.passed and same.max_loss_diff < 1e-6 and same.max_grad_norm_diff == 0.0
    # a gradient averaged twice: the same loss on step 1, half the gradient norm
    drift = compare(_lines([3.0, 2.5], [0.5, 0.45]), _lines([3.0, 2.5], [1.0, 0.9]), tolerance=1e-5)
    assert not drift.passed and drift.max_grad_norm_diff == pytest.approx(0.5)


def test_runs_that_logged_different_steps_are_an_error():
    with pytest.raises(UserError, match="logged steps"):
        compare(_lines([3.0], [1.0]), _lines([3.0, 2.0], [1.0, 1.0]), tolerance=1e-5)


def test_the_reference_is_one_plain_rank_with_the_same_global_batch():
    pipeline = load_recipe(None, ["parallel.pipeline_stages=2", "parallel.zero_stage=1", "train.grad_accum=4"])
    reference = reference_of(pipeline)
    assert (reference.parallel.nproc, reference.parallel.zero_stage, reference.parallel.pipeline_stages) == (1, 0, 1)
    assert reference.train.grad_accum == 4  # the pipeline has one data-parallel replica
    assert reference_of(load_recipe(None, ["parallel.zero_stage=3", "train.grad_accum=2"])).train.grad_accum == 4
    with pytest.raises(UserError, match="already one plain rank"):
        reference_of(load_recipe(None, ["parallel.nproc=1", "parallel.zero_stage=0"]))


def test_verify_passes_zero3_against_one_rank(tmp_path):
    out = tmp_path / "verify"
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "verify", "parallel.zero_stage=3",
                           "audit.enforce=false", "data.train_limit=2000", "--steps", "3", "-o", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "dstk verify: PASS" in proc.stdout
    report = json.loads((out / "verify.json").read_text())
    assert [row["step"] for row in report["steps"]] == [1, 2, 3] and report["passed"]
    # both sides report gradient norms: ZeRO-3's from DeepSpeed, the plain rank's taken by hand
    assert all(row["grad_norm"] and row["reference_grad_norm"] for row in report["steps"])
    assert report["max_loss_diff"] < 1e-5 and report["max_grad_norm_diff"] < 1e-4

"""Resuming a run on another parallel layout (#24): real DeepSpeed runs, 2 ranks on the CPU.

One run trains 8 steps with ZeRO-2 on 2 ranks, saving at step 4. Copies of it are rolled back to
step 4 and continued under another layout: ZeRO-3 with CPU offload on 2 ranks, and, after a worker
is SIGKILLed, ZeRO-1 on the one core it is given (``parallel.nproc=auto``); a 2-stage pipeline run
continues under ZeRO-2. ``benchmarks/
resume_layouts.py`` runs every pair of ZeRO layouts. Each must log the
original's losses for steps 5-8 and end at its weights: the universal copy carried the fp32
weights, Adam's moments and step, the LR schedule and the data position. Layouts DeepSpeed's
universal format does not cover, and another global batch, are refused before any worker starts.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, run_dstk, user_env
from tests.toolkit.test_fault_injection import _kill_when, _losses, _reached
from toolkit.checkpoints import store as checkpoint

RECIPE = ["train.max_steps=8", "train.log_steps=1", "train.save_steps=4", "data.eval=null",
          "audit.enforce=false", "data.train_limit=2000", "parallel.zero_stage=2", "parallel.nproc=2"]


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts") / "original"
    _ok(run_dstk("train", f"output_dir={out}", *RECIPE))
    return out


def _copy_at_step_4(original, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(original, out)
    _ok(run_dstk("rollback", out, "--to", "4"))
    return out


def _same_run(resumed, original) -> None:
    """Steps 5-8 and the final weights are the uninterrupted run's."""
    got, expected = _losses(resumed), _losses(original)
    for step in range(5, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=0), (step, got[step], expected[step])
    mine = load_file(resumed / "final" / "model.safetensors")
    theirs = load_file(original / "final" / "model.safetensors")
    assert mine.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_zero2_checkpoint_resumes_under_zero3_with_offload_as_the_same_run(original, tmp_path):
    out = _copy_at_step_4(original, tmp_path)
    output = _ok(run_dstk("train", out / "recipe.yaml", f"output_dir={out}", "resume=auto",
                          "parallel.zero_stage=3", "parallel.offload=cpu"))
    assert ("converting checkpoint step_000004 for the new layout (parallel.zero_stage 2 -> 3, "
            "parallel.offload none -> cpu)") in output
    _same_run(out, original)
    layouts = json.loads((out / "run.json").read_text())["layouts"]
    assert [(entry["from_step"], entry["zero_stage"], entry["offload"]) for entry in layouts] == [
        (0, 2, "none"), (4, 3, "cpu")]
    report = (out / "report.md").read_text()
    assert "from step 0: 2 rank(s), ZeRO-2; from step 4: 2 rank(s), ZeRO-3 (offload cpu)" in report
    manifest = json.loads((out / "checkpoints" / "step_000008" / checkpoint.MANIFEST).read_text())
    assert manifest["layouts"] == layouts and manifest["layout"]["global_batch"] == 32
    assert checkpoint.why_incomplete(out / "checkpoints" / "universal" / "step_000004") is None


def test_killed_on_2_ranks_and_restarted_with_zero1_on_the_1_rank_it_is_given_with_nproc_auto(original, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "train", f"output_dir={out}", *RECIPE,
                              "parallel.nproc=auto"], cwd=ROOT, env=user_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    _kill_when(first, out, 1, _reached(out, 5))  # a node lost after the checkpoint of step 4
    assert (out / "checkpoints" / "latest").read_text() == "step_000004"
    # the allocation now holds one core: nproc=auto takes one rank, and two accumulation steps
    restarted = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "toolkit.cli", "train", out / "recipe.yaml",
                                f"output_dir={out}", "resume=auto", "parallel.nproc=auto", "parallel.zero_stage=1"],
                               cwd=ROOT, env=user_env(), capture_output=True, text=True, timeout=600)
    output = _ok(restarted)
    assert "train.grad_accum 1 -> 2, keeping the checkpoint's global batch of 32 records" in output
    assert "(parallel.nproc 2 -> 1, parallel.zero_stage 2 -> 1)" in output and "on 1 rank(s)" in output
    _same_run(out, original)
    layouts = json.loads((out / "run.json").read_text())["layouts"]
    assert [(entry["from_step"], entry["nproc"], entry["zero_stage"]) for entry in layouts] == [(0, 2, 2), (4, 1, 1)]


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory):
    """The same training as ``original`` (global batch 32) cut into 2 pipeline stages."""
    out = tmp_path_factory.mktemp("layouts") / "pipelined"
    _ok(run_dstk("train", f"output_dir={out}", *RECIPE, "parallel.pipeline_stages=2", "parallel.zero_stage=1",
                 "train.grad_accum=2"))
    return out


def test_a_pipeline_checkpoint_resumes_under_zero2_as_the_same_run(pipelined, tmp_path):
    out = _copy_at_step_4(pipelined, tmp_path)
    output = _ok(run_dstk("train", out / "recipe.yaml", f"output_dir={out}", "resume=auto",
                          "parallel.pipeline_stages=1", "parallel.zero_stage=2", "train.grad_accum=1"))
    assert "(parallel.zero_stage 1 -> 2, parallel.pipeline_stages 2 -> 1)" in output
    _same_run(out, pipelined)  # the pipeline's parameter names became the model's


def test_a_qlora_run_resumes_on_1_rank_with_its_adapters_and_their_moments(tmp_path_factory, tmp_path):
    adapted = tmp_path_factory.mktemp("layouts") / "qlora"
    adapters = ["lora.enabled=true", "lora.quantize_base=nf4", "lora.dropout=0"]  # no dropout: masks are per rank
    _ok(run_dstk("train", f"output_dir={adapted}", *RECIPE, *adapters))
    out = _copy_at_step_4(adapted, tmp_path)
    _ok(run_dstk("train", out / "recipe.yaml", f"output_dir={out}", "resume=auto", "parallel.nproc=1",
                 "parallel.zero_stage=3", "train.grad_accum=2"))
    got, expected = _losses(out), _losses(adapted)
    for step in range(5, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=0), (step, got[step], expected[step])


def _flat_states(checkpoint_dir, key: str) -> dict[str, torch.Tensor]:
    """Each parameter's ``key`` state rebuilt from a ZeRO-2 checkpoint's per-rank flat partitions,
    through the fragment map each rank saved (DeepSpeed's own files, not the converter's output)."""
    pieces: dict[str, list[torch.Tensor]] = {}
    for rank_file in sorted(checkpoint_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")):
        state = torch.load(rank_file, weights_only=False)["optimizer_state_dict"]
        flat = (state["single_partition_of_fp32_groups"][0] if key == "fp32"
                else state["base_optimizer_state"]["state"][0][key])
        for name, fragment in state["param_slice_mappings"][0].items():
            pieces.setdefault(name, []).append(flat.narrow(0, fragment.start, fragment.numel))
    return {name: torch.cat(parts) for name, parts in pieces.items()}


def test_the_universal_copy_holds_the_original_weights_and_adam_moments(original, tmp_path):
    out = _copy_at_step_4(original, tmp_path)
    done = run_dstk("checkpoints", "convert", out, "--step", "4", "--to", "universal")
    assert "wrote" in _ok(done)
    native, copy = out / "checkpoints" / "step_000004", out / "checkpoints" / "universal" / "step_000004"
    assert checkpoint.why_incomplete(copy) is None
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        expected = _flat_states(native, key)
        assert len(expected) > 10
        for name, values in expected.items():
            converted = torch.load(copy / "zero" / name / f"{key}.pt", weights_only=False)["param"]
            torch.testing.assert_close(converted.flatten(), values, rtol=1e-6, atol=0, msg=f"{name} {key}")
    assert float(torch.load(copy / "zero" / "lm_head.weight" / "step.pt", weights_only=False)) == 4.0


@pytest.mark.parametrize("change,message", [
    (("parallel.nproc=1",), "was trained with global batches of 32 records and the recipe's are 16"),
    (("parallel.tensor_parallel=2", "parallel.zero_stage=1"),
     "resumed with parallel.tensor_parallel=2 cannot change layout"),
    (("parallel.zero_stage=0",), "resumed with parallel.zero_stage=0 cannot change layout"),
])
def test_a_layout_change_that_cannot_carry_the_run_is_refused_before_any_worker(original, tmp_path, change, message):
    out = _copy_at_step_4(original, tmp_path)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    done = run_dstk("train", out / "recipe.yaml", f"output_dir={out}", "resume=auto", *change)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert len(done.stderr.strip().splitlines()) == 1 and "dstk: training" not in done.stdout
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing written or converted


def test_a_checkpoint_of_another_model_or_with_a_damaged_shard_is_refused(original, tmp_path):
    out = _copy_at_step_4(original, tmp_path)
    done = run_dstk("train", out / "recipe.yaml", f"output_dir={out}", "resume=auto", "model=tiny-gpt2")
    assert done.returncode == 2 and "holds checkpoints of model tiny-llama, not tiny-gpt2" in done.stderr, done.stderr
    shard = out / "checkpoints" / "step_000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-10])
    done = run_dstk("checkpoints", "convert", out, "--step", "4", "--to", "universal")
    assert done.returncode == 2 and "checkpoint of step 4 is not usable" in done.stderr, done.stderr
    assert not (out / "checkpoints" / "universal").exists()

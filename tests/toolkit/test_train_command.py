"""`dstk train`: the built-in default end to end, and bad input refused before any worker starts."""

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import run_dstk as dstk
from toolkit.training.shm_collectives import usable_cores

# A credential in the environment, as on any machine that pulls from the hub: it must not reach
# the run directory or the console.
SECRET = "hf_Zq8v3LmP0xR7tN2wK5yB9cD4fG6hJ1sA"


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):

    out = tmp_path_factory.mktemp("default") / "run"
    proc = dstk("train", f"output_dir={out}", env={"HF_TOKEN": SECRET, "WANDB_API_KEY": SECRET})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_default_run_learns_the_task(default_run):
    out, proc = default_run
    result = json.loads((out / "run.json").read_text())["result"]
    before, after = result["eval_before"]["response_match"], result["eval_after"]["response_match"]
    assert before < 0.05 and after > 0.6, (before, after)
    assert result["eval_after"]["loss"] < 0.5 * result["eval_before"]["loss"]
    assert "response match" in proc.stdout


def test_default_run_writes_the_run_directory(default_run):
    out, _ = default_run
    for name in ("recipe.yaml", "ds_config.json", "run.json", "metrics.jsonl", "audit/report.json",
                 "checkpoints/latest", "final/config.json", "final/model.safetensors",
                 "final/tokenizer.json", "final/dstk_lineage.json"):
        assert (out / name).is_file(), name
    assert '"auto"' not in (out / "ds_config.json").read_text()


def test_metrics_have_the_product_fields_and_the_loss_falls(default_run):
    out, _ = default_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    for line in steps:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "elapsed_s", "peak_rss_mb", "comm_share"} <= set(line)
        assert line["tokens"] > 0 and line["peak_rss_mb"] > 0 and 0 < line["comm_share"] < 1
    assert steps[-1]["loss"] < 0.3 * steps[0]["loss"]
    assert any("eval_loss" in line for line in lines)


def test_the_run_report_says_what_the_run_directory_says(default_run):
    out, proc = default_run
    run = json.loads((out / "run.json").read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    report = (out / "report.md").read_text()
    losses = [line["loss"] for line in lines if "loss" in line]
    comm = [line["comm_share"] for line in lines if "comm_share" in line]
    after = run["result"]["eval_after"]
    assert f"| loss | {losses[0]:.4f} -> {losses[-1]:.4f} |" in report
    assert f"-> {after['response_match']:.1%} ({after['records']} held-out records)" in report
    assert f"| communication | {sum(comm) / len(comm):.0%} of step time" in report
    routed = run["result"]["shm_collectives"]  # the default's 2 ranks, each with a core of its own
    assert routed == (usable_cores() >= 2) and ("collectives through shared memory" in report) == routed
    assert run["runtime"] == {"accelerator": "cpu", "comm_backend": "gloo",  # the CPU path, as chosen for it
                              "optimizer": "torch.optim.adamw.AdamW (fused)", "attention": "sdpa"}
    assert "| runtime | cpu, gloo, torch.optim.adamw.AdamW (fused), sdpa attention |" in report
    assert f"| audit | {run['audit']['verdict']}" in report and "](report.png)" in report
    picture = (out / "report.png").read_bytes()
    assert picture.startswith(b"\x89PNG\r\n\x1a\n") and len(picture) > 10_000  # three drawn panels, not a blank
    assert f"report         {out / 'report.md'}" in proc.stdout


def test_the_console_carries_dstk_not_its_libraries_start_up(default_run, tmp_path):
    """No DeepSpeed launcher INFO lines, accelerator guesses or op-build notes; `dstk -v` asks for them."""
    _, proc = default_run
    output = proc.stdout + proc.stderr
    for noise in ("[INFO]", "Setting accelerator to CPU", "built successfully", "CUDA_VISIBLE_DEVICES",
                  "Failed to load CPU gemm_4bit_forward"):
        assert noise not in output, noise
    verbose = dstk("-v", "train", f"output_dir={tmp_path / 'run'}", "--dry-run", timeout=120)
    assert verbose.returncode == 0 and "--log_level info" in verbose.stdout


def test_lineage_names_data_audit_and_versions(default_run):
    out, _ = default_run
    run = json.loads((out / "run.json").read_text())
    data_file = Path(run["data"]["train"]["path"])
    assert run["data"]["train"]["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert run["audit"]["verdict"] == "pass" and run["audit"]["enforced"]
    assert run["versions"]["deepspeed"] and run["recipe_sha256"]
    assert run["parallel"]["zero_stage"] == 1 and run["status"] == "completed"


def test_secrets_in_the_environment_reach_no_file_or_log(default_run):
    out, proc = default_run
    assert SECRET not in proc.stdout + proc.stderr
    leaked = [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []
    assert json.loads((out / "run.json").read_text())["trust_remote_code"] is False


@pytest.mark.parametrize("again", [[], ["resume=auto"]], ids=["rerun", "resume"])
def test_a_completed_run_is_never_rewritten(default_run, again):
    """Neither run again nor resumed with nothing left to train: its record stays byte for byte."""
    out, _ = default_run
    before = _snapshot(out)
    proc = dstk("train", f"output_dir={out}", *again, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"holds a completed run of 300 steps (its model: {out / 'final'})" in proc.stderr
    assert "train.max_steps above 300" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert _snapshot(out) == before


def test_a_resumed_run_keeps_its_first_evaluation(default_run, tmp_path):
    """Trained further with resume=auto, the run's eval before training is still the first attempt's."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(default_run[0], out)
    first = json.loads((out / "run.json").read_text())["result"]["eval_before"]
    proc = dstk("train", f"output_dir={out}", "resume=auto", "train.max_steps=304", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "run.json").read_text())["result"]
    assert result["steps"] == 304 and result["eval_before"] == first
    assert "response match" in proc.stdout and "-> " in (out / "report.md").read_text()


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture()
def existing_dir(tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"status": "completed", "recipe_sha256": "x"}))
    (out / "notes.txt").write_text("keep me")
    return out


def _bad_data(tmp_path: Path) -> Path:
    path = tmp_path / "wrong_fields.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(20)))
    return path


@pytest.mark.parametrize("case", ["unknown key", "zero stage 5", "micro batch 0", "missing data",
                                  "wrong fields"])
def test_bad_input_exits_2_before_any_worker(case, existing_dir, tmp_path):
    args = {
        "unknown key": ["train.max_step=3"],
        "zero stage 5": ["parallel.zero_stage=5"],
        "micro batch 0": ["train.micro_batch_size=0"],
        "missing data": [f"data.train={tmp_path / 'nope.jsonl'}"],
        "wrong fields": [f"data.train={_bad_data(tmp_path)}", "data.eval=null"],
    }[case]
    before = _snapshot(existing_dir)
    proc = dstk("train", f"output_dir={existing_dir}", "resume=auto", *args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dstk train: error:"), proc.stderr
    assert "spawned with command" not in proc.stdout + proc.stderr  # no DeepSpeed worker started
    assert _snapshot(existing_dir) == before


def test_wrong_fields_are_named_in_recipe_keys(tmp_path):
    """`dstk train` users are told the recipe key to set, not the audit command's flag."""
    proc = dstk("train", f"output_dir={tmp_path / 'run'}", f"data.train={_bad_data(tmp_path)}", "data.eval=null",
                timeout=120)
    assert proc.returncode == 2
    assert "field 'prompt' not found; fields present: question, answer" in proc.stderr
    assert "set data.prompt_field to the field that holds it, e.g. data.prompt_field=question" in proc.stderr
    assert "--prompt-field" not in proc.stderr


def test_failing_audit_stops_the_run_with_exit_1(tmp_path):
    """Eval records copied into the training data: leakage, so no worker may start."""
    rows = [{"prompt": f"reverse {n} =", "response": f" {str(n)[::-1]}"} for n in range(1000, 1400)]
    train, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    out = tmp_path / "run"
    proc = dstk("train", f"output_dir={out}", f"data.train={train}", f"data.eval={evaluation}", timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "data audit failed" in proc.stderr and str(out / "audit" / "report.md") in proc.stderr
    report = json.loads((out / "audit" / "report.json").read_text())
    assert report["verdict"] == "fail"
    leaked = {r["index"] for f in report["findings"] if f["check"] == "exact_duplicate"
              for r in f["records"] if r["split"] == "eval"}
    assert leaked == {0, 1, 2, 3, 4}
    assert not (out / "checkpoints").exists() and "spawned with command" not in proc.stdout + proc.stderr

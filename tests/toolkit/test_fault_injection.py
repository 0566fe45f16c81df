"""Crashes, signals and divergences on real 2-rank runs: what survives, and that a resumed run is the same run.

One ``dstk train`` run is stopped three times (SIGTERM to dstk; SIGKILL of a worker between
checkpoints; SIGKILL of a worker while a checkpoint is being written), resumed each time with
``resume=auto``, and must end with the per-step losses and final weights of a run that was never
interrupted, with a ``latest`` that verifies after every stop and no process left behind.
"""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.multirank import run_deepspeed
from toolkit.checkpoints import store as checkpoint

# the recipe of the divergence worker's reference run, which these runs are compared with
RECIPE = ["train.max_steps=16", "train.log_steps=1", "train.save_steps=4", "data.eval=null",
          "audit.enforce=false", "data.train_limit=2000"]


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path):
    """Whatever a failing test leaves running is killed."""
    yield
    for process in _processes_of(tmp_path):
        process.kill()


def _train(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "toolkit.cli", "train", f"output_dir={out}", *RECIPE, *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _processes_of(out: Path) -> list:
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if any(str(out) in part for part in p.info["cmdline"] or ())]


def _worker(out: Path, rank: int):
    import psutil

    for process in _processes_of(out):
        try:
            if " -m toolkit.launching.worker" in " ".join(process.info["cmdline"]) and process.environ().get("RANK") == str(rank):
                return process
        except psutil.NoSuchProcess:
            pass
    return None


def _logged_steps(out: Path, since: int = 0) -> list[dict]:
    """The metrics lines of ``out``, from line ``since`` on (a resumed run appends to the file)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()[since:] if line.endswith("}")]


def _reached(out: Path, step: int):
    """A condition: the run started now has logged ``step`` or later."""
    since = len(_logged_steps(out))
    return lambda: any(line.get("step", 0) >= step for line in _logged_steps(out, since))


def _wait_for(proc: subprocess.Popen, ready) -> None:
    # a guard against a hang, not a timing: the first launch on a machine may build DeepSpeed's ops
    deadline = time.monotonic() + 600
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.002)


def _stopped_whole(proc: subprocess.Popen, out: Path) -> str:
    """dstk exits non-zero saying how to resume, no process of the run is left, and ``latest``
    names a checkpoint that verifies. Returns dstk's output."""
    output, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0 and "resume=auto" in output, output[-3000:]
    deadline = time.monotonic() + 30
    while _processes_of(out) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _processes_of(out) == [], "a process of the stopped run is still alive"
    latest = checkpoint.newest_complete(out / "checkpoints")
    assert latest is not None and latest.name == (out / "checkpoints" / "latest").read_text().strip()
    assert checkpoint.why_incomplete(latest) is None
    return output


def _kill_when(proc: subprocess.Popen, out: Path, rank: int, ready) -> str:
    """SIGKILL worker ``rank`` (an OOM kill, a node failure) as soon as ``ready()``."""
    _wait_for(proc, ready)
    worker = _worker(out, rank)
    assert worker is not None, "the worker to kill was not found"
    worker.send_signal(signal.SIGKILL)
    return _stopped_whole(proc, out)


def _losses(out: Path) -> dict[int, float]:
    """Each step's loss as last logged (a resumed run logs its replayed steps again)."""
    return {line["step"]: line["loss"] for line in _logged_steps(out) if "loss" in line}


def _close(a: float, b: float, rel: float = 1e-6) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


@pytest.fixture(scope="module")
def divergence_runs(tmp_path_factory):
    """The divergence worker's launch: OUT/reference (uninterrupted), OUT/stop and OUT/skip."""
    out = tmp_path_factory.mktemp("divergence")
    return out, run_deepspeed(ROOT / "tests/toolkit/workers/divergence.py", out, timeout=600)[0]


def test_stopped_and_killed_runs_resume_to_the_uninterrupted_run(divergence_runs, tmp_path):
    reference = divergence_runs[0] / "reference"
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"

    proc = _train(out)  # a scheduler's SIGTERM reaches only dstk, which must stop every worker
    _wait_for(proc, _reached(out, 5))
    proc.send_signal(signal.SIGTERM)
    _stopped_whole(proc, out)
    assert (checkpoints / "latest").read_text() == "step_000004"

    _kill_when(_train(out, "resume=auto"), out, 1, _reached(out, 7))  # a worker dies between checkpoints
    assert (checkpoints / "latest").read_text() == "step_000004"

    staging = checkpoints / ".step_000012.partial"
    _kill_when(_train(out, "resume=auto"), out, 0, staging.exists)  # ... or while a checkpoint is written
    assert staging.is_dir() and not (checkpoints / "step_000012").exists()
    assert (checkpoints / "latest").read_text() == "step_000008"

    proc = _train(out, "resume=auto")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]

    expected, got = _losses(reference), _losses(out)
    assert sorted(got) == sorted(expected) == list(range(1, 17))
    assert all(_close(got[s], expected[s]) for s in expected), [(s, got[s], expected[s]) for s in expected]
    mine, theirs = load_file(out / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert torch.allclose(mine[key], theirs[key], rtol=1e-6, atol=1e-8), key
    assert len([line for line in _logged_steps(out) if line.get("step") == 5]) == 3  # run 3 times in all


def test_divergence_guard_stops_or_skips_from_the_last_good_checkpoint(divergence_runs):
    folder, rank0 = divergence_runs
    reference = rank0["reference"]
    assert len(reference) == 16 and all(math.isfinite(x) for x in reference)

    assert rank0["stopped"] is not None and "nan" in rank0["stopped"] and "at step 7" in rank0["stopped"]
    stop = folder / "stop"
    assert (stop / "checkpoints" / "latest").read_text() == "step_000004"
    assert checkpoint.why_incomplete(stop / "checkpoints" / "step_000004") is None
    assert not (stop / "checkpoints" / "step_000008").exists()
    events = [line for line in _logged_steps(stop) if "event" in line]
    assert [(e["event"], e["step"], e["reason"], e["action"]) for e in events] == [("divergence", 7, "nan", "stop")]

    skip = folder / "skip"
    events = [line for line in _logged_steps(skip) if "event" in line]
    assert [(e["event"], e["step"]) for e in events] == [("divergence", 7), ("rollback", 7)]
    assert events[1]["to_step"] == 4 and events[1]["skipped"] == [7]
    losses = _losses(skip)
    assert 7 not in losses and all(math.isfinite(v) for v in losses.values()) and rank0["skip_weights_finite"]
    # steps 5 and 6 were replayed from the checkpoint of step 4: they are the reference's steps
    assert all(_close(losses[s], reference[s - 1]) for s in (1, 2, 3, 4, 5, 6))
    assert (skip / "final" / "model.safetensors").is_file()

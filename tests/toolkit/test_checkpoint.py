"""Which checkpoint a resume continues from: only complete ones, whose manifest verifies.

The runs' own checkpoints go through the same functions in the multi-rank tests (every resume
there verifies a real DeepSpeed checkpoint); these cases break checkpoints on purpose.
"""

import json
import logging

import pytest

from toolkit.checkpoints import store as checkpoint


def _checkpoint(folder, step, payload=b"weights", eval_loss=None):
    path = folder / checkpoint.tag(step)
    (path / "sub").mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(payload)
    (path / "sub" / "optim.pt").write_bytes(payload * 2)
    checkpoint.write_manifest(path, step, {"loss": 1.0 / step, "eval_loss": eval_loss})
    checkpoint.point_latest(folder, path.name)
    return path


@pytest.fixture
def folder(tmp_path):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4)
    return tmp_path


def test_latest_complete_checkpoint_is_chosen(folder):
    assert checkpoint.why_incomplete(folder / "step_000004") is None
    assert checkpoint.newest_complete(folder) == folder / "step_000004"
    assert (folder / "latest").read_text() == "step_000004"


@pytest.mark.parametrize("damage,reason", [
    (lambda p: (p / "sub" / "optim.pt").write_bytes(b"weightsweightX"), "does not match its sha256"),
    (lambda p: (p / "sub" / "optim.pt").write_bytes(b"short"), "has 5 bytes, the manifest says 14"),
    (lambda p: (p / "mp_rank_00_model_states.pt").unlink(), "mp_rank_00_model_states.pt is missing"),
    (lambda p: (p / checkpoint.MANIFEST).unlink(), "no readable dstk_manifest.json"),
])
def test_corrupt_or_incomplete_checkpoint_is_skipped_with_a_warning(folder, caplog, damage, reason):
    damage(folder / "step_000004")
    assert reason in checkpoint.why_incomplete(folder / "step_000004")
    with caplog.at_level(logging.WARNING):
        assert checkpoint.newest_complete(folder) == folder / "step_000002"
    assert f"skipping checkpoint {folder / 'step_000004'}: " in caplog.text and reason in caplog.text


def test_a_save_killed_before_its_rename_leaves_latest_and_older_checkpoints_alone(folder):
    staging = folder / ".step_000006.partial"  # what save() writes into before the rename
    staging.mkdir()
    (staging / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert checkpoint.newest_complete(folder) == folder / "step_000004"


def test_rolled_back_latest_wins_over_newer_checkpoints(folder):
    checkpoint.point_latest(folder, "step_000002")
    assert checkpoint.newest_complete(folder) == folder / "step_000002"


def test_no_complete_checkpoint_means_a_fresh_start(tmp_path):
    (tmp_path / "step_000001").mkdir()
    assert checkpoint.newest_complete(tmp_path) is None


def _names(folder):
    return sorted(p.name for p in folder.glob("step_*"))


def test_keep_last_keeps_the_newest_and_the_best_by_eval_loss(tmp_path):
    for step, eval_loss in [(2, 0.9), (4, 0.3), (6, 0.5), (8, 0.6), (10, 0.7)]:
        _checkpoint(tmp_path, step, eval_loss=eval_loss)
        checkpoint.prune(tmp_path, keep_last=2, keep_best=1)
    assert _names(tmp_path) == ["step_000004", "step_000008", "step_000010"]


def test_keep_last_zero_keeps_everything(folder):
    assert checkpoint.prune(folder, keep_last=0, keep_best=0) == []
    assert _names(folder) == ["step_000002", "step_000004"]


def test_rollback_moves_latest_and_keeps_later_checkpoints(folder):
    checkpoint.rollback(folder, 2)
    assert (folder / "latest").read_text() == "step_000002" and _names(folder) == ["step_000002", "step_000004"]
    # pruning after the rollback never deletes what comes after the resume point
    _checkpoint(folder, 3)
    checkpoint.point_latest(folder, "step_000003")
    checkpoint.prune(folder, keep_last=1, keep_best=0)
    assert _names(folder) == ["step_000003", "step_000004"]


@pytest.mark.parametrize("damage,message", [
    (lambda f: None, "no checkpoint of step 7 (complete checkpoints: 2, 4)"),
    (lambda f: (f / "step_000002" / "sub" / "optim.pt").write_bytes(b"x"), "is not a complete checkpoint"),
])
def test_rollback_to_a_missing_or_broken_checkpoint_is_refused(folder, damage, message):
    from toolkit.errors import UserError

    damage(folder)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        checkpoint.rollback(folder, 7 if "step 7" in message else 2)
    assert (folder / "latest").read_text() == "step_000004"


def test_listing_reports_metrics_size_and_state(folder):
    (folder / ".step_000006.partial").mkdir()
    (folder / "step_000004" / "sub" / "optim.pt").write_bytes(b"weightsweightX")
    listed = {entry["step"]: entry for entry in checkpoint.list_checkpoints(folder)}
    assert listed[2]["state"] == "complete" and listed[2]["loss"] == 0.5 and listed[2]["bytes"] > 21
    assert "sha256" in listed[4]["state"] and listed[4]["latest"]
    assert listed[6]["state"] == "partial"


def test_cli_lists_checkpoints_and_rolls_back(folder, capsys):
    from toolkit import cli

    (folder / "run.json").write_text("{}")
    (folder / "checkpoints").mkdir()
    for name in ("step_000002", "step_000004", "latest"):
        (folder / name).rename(folder / "checkpoints" / name)
    assert cli.main(["checkpoints", str(folder)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].split() == ["2", "0.5000", "-", "0.0", "MiB", "complete"]
    assert rows[2].split()[:2] == ["*", "4"]
    assert cli.main(["rollback", str(folder), "--to", "2"]) == 0
    assert "resume=auto" in capsys.readouterr().out
    assert (folder / "checkpoints" / "latest").read_text() == "step_000002"
    assert cli.main(["checkpoints", str(folder), "--json"]) == 0
    assert [entry["latest"] for entry in json.loads(capsys.readouterr().out)] == [True, False]

"""Which checkpoint a resume continues from: only complete ones, whose manifest verifies.

The runs' own checkpoints go through the same functions in the multi-rank tests (every resume
there verifies a real DeepSpeed checkpoint); these cases break checkpoints on purpose.
"""

import logging

import pytest

from toolkit import checkpoint


def _checkpoint(folder, step, payload=b"weights"):
    path = folder / checkpoint.tag(step)
    (path / "sub").mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(payload)
    (path / "sub" / "optim.pt").write_bytes(payload * 2)
    checkpoint.write_manifest(path, step)
    checkpoint.point_latest(folder, path.name)
    return path


@pytest.fixture
def folder(tmp_path):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4)
    return tmp_path


def test_latest_complete_checkpoint_is_chosen(folder):
    assert checkpoint.verify(folder / "step_000004") is None
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
    assert reason in checkpoint.verify(folder / "step_000004")
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

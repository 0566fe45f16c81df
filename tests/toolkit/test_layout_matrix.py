"""What validation accepts runs to the end (benchmarks/layout_matrix.py).

CI's slice of the matrix lives whole runs on 2 ranks: train with checkpoints, final/ reloaded to
the engine's logits, rollback and resume to the same losses, NF4 export. The README's table is the
matrix validation gives today, so a change to what validation accepts shows there.
"""

import pytest

from benchmarks import layout_matrix as matrix
from tests.conftest import ROOT


@pytest.mark.parametrize("combo", matrix.CI_SLICE, ids=lambda combo: matrix.short(matrix.full(combo)))
def test_an_accepted_combination_completes_every_stage(combo, tmp_path):
    assert matrix.refusal(combo) is None
    stages = matrix.run_combo(matrix.full(combo), tmp_path, timeout=600)
    assert stages == dict.fromkeys(matrix.STAGES, "pass"), (tmp_path / "log.txt").read_text()[-4000:]


def test_the_readme_shows_the_matrix_validation_gives():
    readme = (ROOT / "README.md").read_text()
    chosen, refused = matrix.plan()
    missing = [matrix.short(combo) for combo in chosen if f"| {matrix.short(combo)} |" not in readme]
    missing += [reason for reason in set(refused.values()) if f"| {reason} |" not in readme]
    assert not missing, "run python benchmarks/layout_matrix.py and paste its table into the README"

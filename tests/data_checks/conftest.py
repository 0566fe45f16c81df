"""Fixtures of the audit tests."""

from __future__ import annotations

import pytest
from audit_data import arithmetic


@pytest.fixture(scope="session")
def clean_rows() -> tuple[list[dict], list[dict]]:
    """3000 training and 300 eval records, disjoint, sharing six prompt templates."""
    train = arithmetic(3000, seed=1)
    eval_ = arithmetic(300, seed=2, exclude={r["_key"] for r in train})
    return train, eval_

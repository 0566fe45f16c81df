"""The launcher's checks before it starts any worker."""

import os


def test_a_stale_torch_extension_lock_is_named_before_launch(tmp_path, monkeypatch):
    """A lock left by a killed op build makes every later job hang silently; dstk says so first."""
    from toolkit.launcher import stale_extension_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh = tmp_path / "py311_cpu" / "fused_adam" / "lock", tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    os.utime(stale, (0, 0))
    warnings = stale_extension_locks()
    assert len(warnings) == 1 and str(stale) in warnings[0] and "delete it" in warnings[0]

"""The launcher's checks before it starts any worker."""

import os


def test_a_stale_torch_extension_lock_is_named_before_launch(tmp_path, monkeypatch):
    """A lock left by a killed op build makes every later job hang silently; dstk says so first."""
    from toolkit.launching.launcher import stale_extension_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh = tmp_path / "py311_cpu" / "fused_adam" / "lock", tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.touch()
    os.utime(stale, (0, 0))
    warnings = stale_extension_locks()
    assert len(warnings) == 1 and str(stale) in warnings[0] and "delete it" in warnings[0]


def test_deepspeeds_leftover_shared_memory_of_a_run_is_removed_and_no_other(tmp_path):
    from pathlib import Path

    from toolkit.launching.launcher import remove_shm_buffers

    shm = Path("/dev/shm")
    if not shm.is_dir():
        import pytest

        pytest.skip("no /dev/shm here")
    ours = [shm / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1{n}_{rank}" for n in (7, 8) for rank in (0, 1)]
    for path in ours:
        path.write_bytes(b"x")
    try:
        assert remove_shm_buffers(17) == ours[:2]
        assert [path.exists() for path in ours] == [False, False, True, True]  # another run's stay
    finally:
        for path in ours:
            path.unlink(missing_ok=True)


def test_a_node_that_sees_other_data_than_node_0_says_which(tmp_path):
    from data_checks.files import sha256_file
    from toolkit.launching.nodes import data_problems

    train, folder = tmp_path / "train.jsonl", tmp_path / "eval"
    train.write_text('{"text": "a"}\n')
    folder.mkdir()
    (folder / "part0.jsonl").write_text('{"text": "b"}\n')
    data = {"train": {"path": str(train), "sha256": sha256_file(train)},
            "eval": {"path": str(folder), "sha256": {"part0.jsonl": sha256_file(folder / "part0.jsonl")}},
            "hub": {"path": "org/dataset", "sha256": None}}
    assert data_problems(data) == []
    train.write_text('{"text": "A"}\n')
    (folder / "part0.jsonl").unlink()
    assert data_problems(data) == [f"data.train file {train} differs from node 0's",
                                   f"data.eval file {folder / 'part0.jsonl'} is missing"]


def test_more_ranks_than_the_hosts_gpus_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    """NCCL cannot share a GPU between ranks: the default recipe's 2 ranks on a 1-GPU host would
    fail in every worker after the audit; the launcher refuses first and says what to set."""
    import pytest

    from toolkit.errors import UserError
    from toolkit.launching import launcher
    from toolkit.recipe import load_recipe

    class OneGpu:  # what DeepSpeed's CUDA accelerator answers on a one-GPU host
        def device_name(self):
            return "cuda"

        def device_count(self):
            return 1

    monkeypatch.setattr(launcher, "get_accelerator", OneGpu)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"parallel.nproc=2 starts 2 ranks on this host, which has 1 CUDA.*"
                                        r"set parallel.nproc=1"):
        launcher.launch(load_recipe("tiny", [f"output_dir={out}"]))
    assert not out.exists()
    launcher.check_devices(load_recipe("tiny", ["parallel.nproc=1"]))  # one rank fits

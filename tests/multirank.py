"""Run a script under the real ``deepspeed`` launcher with N CPU ranks and collect per-rank results.

Test side::

    results = run_deepspeed(WORKER, "--family", "llama", nproc=2)   # one dict per rank, by rank

Worker side (the script, one process per rank)::

    from tests.multirank import write_result
    write_result({"loss": 1.23})

On this machine DeepSpeed picks its CPU accelerator and the gloo backend by itself. Each launch
costs 10-20 s of start-up, so a worker should loop over its cases rather than be launched per case.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.conftest import ROOT, user_env
from toolkit.launching.launcher import free_port, remove_shm_buffers

RESULTS_ENV = "DSTK_TEST_RESULTS"


def run_deepspeed(script: str | Path, *args: object, nproc: int = 2, timeout: float = 300,
                  env: dict[str, str] | None = None) -> list[dict]:
    """Launch ``deepspeed --num_gpus nproc script args...`` and return each rank's result.

    Args:
        script: The worker script.
        *args: Its command-line arguments (``str()`` of each).
        nproc: Ranks to start.
        timeout: Seconds before the launch and all its ranks are killed.
        env: Extra environment variables for the ranks.

    Returns:
        The dicts the ranks passed to :func:`write_result`, ordered by rank.

    Raises:
        RuntimeError: Non-zero exit, timeout, or a rank that wrote no result; the message holds
            the tail of the launch's output.
    """
    with tempfile.TemporaryDirectory(prefix="dstk-ranks-") as results:
        # ranks share few cores; more threads only contend
        environ = user_env(OMP_NUM_THREADS="1", **{RESULTS_ENV: results}, **(env or {}))
        port = free_port()
        command = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(nproc),
                   "--master_port", str(port), str(script), *map(str, args)]
        # own session: on timeout the launcher and every rank it started are killed together
        proc = subprocess.Popen(command, cwd=ROOT, env=environ, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise RuntimeError(f"{script} timed out after {timeout}s\n{output[-6000:]}") from None
        finally:
            remove_shm_buffers(port)
        files = {int(f.stem.removeprefix("rank")): f for f in Path(results).glob("rank*.json")}
        if proc.returncode != 0 or sorted(files) != list(range(nproc)):
            raise RuntimeError(
                f"{script} exited {proc.returncode} with results from ranks {sorted(files)}\n{output[-6000:]}"
            )
        return [json.loads(files[rank].read_text()) for rank in range(nproc)]


def write_result(result: dict) -> None:
    """Worker side: record this rank's result (JSON-serialisable) for :func:`run_deepspeed`."""
    path = Path(os.environ[RESULTS_ENV], f"rank{os.environ['RANK']}.json")
    path.write_text(json.dumps(result))


def scratch_dir() -> Path:
    """Worker side: a folder every rank of this launch sees, removed after it."""
    return Path(os.environ[RESULTS_ENV])

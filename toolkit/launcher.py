"""From a validated recipe to running DeepSpeed workers: gate first, then the `deepspeed` launcher.

The launcher is DeepSpeed's own (``deepspeed.launcher.runner``, what the ``deepspeed`` command
runs), started with this Python so workers see the same environment; each worker runs
``toolkit.worker``, the module behind ``launch/train.py``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from toolkit.recipe import Recipe
from toolkit.rundir import RunDir, prepare


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(recipe: Recipe, recipe_path: Path, port: int) -> list[str]:
    """The launcher command line that runs ``recipe_path`` on ``parallel.nproc`` local ranks."""
    return [sys.executable, "-m", "deepspeed.launcher.runner",
            "--num_gpus", str(recipe.parallel.nproc), "--master_port", str(port),
            "--module", "toolkit.worker", "--recipe", str(recipe_path)]


def worker_env(recipe: Recipe) -> dict[str, str]:
    env = dict(os.environ)
    # Each rank gets its share of the cores; oversubscribed OpenMP threads slow every rank down.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // recipe.parallel.nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch(recipe: Recipe) -> int:
    """Validate and gate the run, start the workers and wait; return the launcher's exit code.

    Raises:
        UserError / AuditFailed: before any worker starts (exit 2 / 1).
    """
    run = prepare(recipe)
    if "pipeline" in run["parallel"]:
        print(run["parallel"]["pipeline"]["summary"], flush=True)
    run_dir = RunDir(Path(recipe.output_dir))
    port = recipe.parallel.master_port or free_port()
    return subprocess.run(command(recipe, run_dir.recipe, port), env=worker_env(recipe)).returncode

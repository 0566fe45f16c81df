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
    for warning in stale_extension_locks():
        print(f"dstk: warning: {warning}", file=sys.stderr, flush=True)
    run_dir = RunDir(Path(recipe.output_dir))
    port = recipe.parallel.master_port or free_port()
    # its own session: the launcher and its workers form one process group that dstk can stop whole
    launcher = subprocess.Popen(command(recipe, run_dir.recipe, port), env=worker_env(recipe),
                                start_new_session=True)
    return wait_stopping_on_signals(launcher)


def stale_extension_locks(max_age_s: float = 900) -> list[str]:
    """Warnings for torch-extension build locks old enough to have been left by a killed job.

    DeepSpeed compiles and loads its ops through torch's extension cache, which holds a ``lock``
    file while it does; a process killed meanwhile leaves it behind, and from then on every job
    waits for it forever, silently, before its first step. A real build takes a minute or two.
    """
    import time

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    warnings = []
    for lock in sorted(root.glob("**/lock")):
        age = time.time() - lock.stat().st_mtime
        if age > max_age_s:
            warnings.append(f"{lock} is {age / 60:.0f} minutes old; unless a DeepSpeed op is being built right "
                            "now, a killed job left it and the workers will hang at start-up: delete it")
    return warnings


def wait_stopping_on_signals(launcher: subprocess.Popen) -> int:
    """Wait for the launcher; SIGTERM, SIGINT or SIGHUP to dstk stops it and every worker.

    DeepSpeed's local launcher terminates its workers on SIGTERM, but its runner in front of it
    does not pass signals on, and a scheduler's SIGTERM or a closed terminal reaches only dstk:
    without this the workers would go on training, orphaned.

    Returns:
        The launcher's exit code; 128 + N when signal N stopped it, as a shell reports it.
    """
    import signal
    import threading

    def stop(signum, frame):
        try:
            os.killpg(launcher.pid, signal.SIGTERM)
        except ProcessLookupError:  # already gone
            pass

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    main_thread = threading.current_thread() is threading.main_thread()  # where Python allows handlers
    previous = {sig: signal.signal(sig, stop) for sig in handled} if main_thread else {}
    try:
        code = launcher.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code

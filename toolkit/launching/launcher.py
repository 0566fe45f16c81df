"""From a validated recipe to running DeepSpeed workers: gate first, then the `deepspeed` launcher.

The launcher is DeepSpeed's own (``deepspeed.launcher.runner``, what the ``deepspeed`` command
runs), started with this Python so workers see the same environment; each worker runs
``toolkit.launching.worker``, the module behind ``launch/train.py``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from deepspeed.accelerator import get_accelerator

from toolkit import quiet
from toolkit.errors import UserError
from toolkit.launching import nodes
from toolkit.plan.prepare import prepare
from toolkit.recipe import Recipe
from toolkit.rundir import RunDir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(recipe: Recipe, run_dir: Path, port: int, node_rank: int | None = None,
            world_hostfile: Path | None = None) -> list[str]:
    """The DeepSpeed launcher command line that runs the run planned in ``run_dir`` on this node's ranks.

    One node: ``parallel.nproc`` local ranks. A hostfile: every host in it, started from here
    through ``parallel.launcher``. One launcher per node: this node's ranks (``--no_ssh``), the
    world read from ``world_hostfile`` (see :func:`toolkit.launching.nodes.world_hostfile`).
    """
    p = recipe.parallel
    # DeepSpeed's launchers log their start-up (commands, rank maps, CUDA_VISIBLE_DEVICES on a CPU) at
    # INFO; dstk -v shows it, errors always show
    head = [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "info" if quiet.verbose() else "error"]
    if p.hostfile is not None:
        head += ["--hostfile", str(Path(p.hostfile).resolve()), "--launcher", p.launcher,
                 "--master_addr", p.master_addr or next(iter(nodes.read_hostfile(p.hostfile)))]
    elif node_rank is not None:
        head += ["--hostfile", str(world_hostfile), "--no_ssh", "--node_rank", str(node_rank),
                 "--master_addr", p.master_addr]
    else:
        head += ["--num_gpus", str(p.nproc)]
    return [*head, "--master_port", str(port), "--module", "toolkit.launching.worker", "--run-dir", str(run_dir.resolve())]


def check_devices(recipe: Recipe) -> None:
    """Refuse more ranks on this host than it has accelerators: NCCL cannot share a GPU between ranks.

    On a CPU every rank is a process, and any number runs.
    """
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return
    here, devices = recipe.parallel.nproc // recipe.parallel.nodes, accelerator.device_count()
    if here > devices:
        name = accelerator.device_name().upper()
        raise UserError(f"parallel.nproc={recipe.parallel.nproc} starts {here} ranks on this host, which has "
                        f"{devices} {name} device(s)", f"set parallel.nproc={devices * recipe.parallel.nodes}")


def worker_env(recipe: Recipe) -> dict[str, str]:
    env = dict(os.environ)
    # Each rank gets its share of the cores; oversubscribed OpenMP threads slow every rank down.
    ranks_here = recipe.parallel.nproc // recipe.parallel.nodes
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks_here)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    # the accelerator DeepSpeed chose here, so that its launchers and workers do not each detect it
    # again and say so (on a CPU: a warning per process)
    env.setdefault("DS_ACCELERATOR", get_accelerator()._name)
    return env


def launch(recipe: Recipe, node_rank: int | None = None, dry_run: bool = False) -> int:
    """Validate and gate the run, start the workers and wait; return the launcher's exit code.

    Args:
        node_rank: this host's node number, with one launcher per node (``parallel.nodes`` > 1).
        dry_run: print the launcher command line instead of gating and launching; write nothing.

    Raises:
        UserError / AuditFailed: before any worker starts (exit 2 / 1).
    """
    nodes.check_node_rank(recipe, node_rank)
    if recipe.parallel.hostfile is not None:
        nodes.check_hostfile(recipe)
    else:
        check_devices(recipe)
    run_dir = RunDir(Path(recipe.output_dir))
    port = nodes.master_port(recipe) or free_port()
    with tempfile.TemporaryDirectory(prefix="dstk-launch-") as scratch:
        world = nodes.world_hostfile(recipe, Path(scratch) / "hostfile") if node_rank is not None else None
        if dry_run:
            print(shlex.join(command(recipe, run_dir.root, port, node_rank, world)))
            if world is not None:
                print(f"dstk: world: {' '.join(world.read_text().splitlines())}", file=sys.stderr)
            return 0
        with contextlib.ExitStack() as stack:
            if node_rank is None:
                run = prepare(recipe)
            else:
                run = stack.enter_context(nodes.NodeGate(recipe, node_rank)).prepare()
            argv = command(recipe, run_dir.root, port, node_rank, world)
            if "pipeline" in run["parallel"]:
                print(run["parallel"]["pipeline"]["summary"], flush=True)
            for warning in stale_extension_locks():
                print(f"dstk: warning: {warning}", file=sys.stderr, flush=True)
            # its own session: the launcher and its workers form one process group that dstk can stop whole
            env = worker_env(recipe)
            if node_rank is not None:  # the NodeGate compared every node's data already
                env[nodes.AGREED_ENV] = "1"
            launcher = subprocess.Popen(argv, env=env, start_new_session=True)
            try:
                return wait_stopping_on_signals(launcher)
            finally:
                remove_shm_buffers(port)


def remove_shm_buffers(port: int) -> list[Path]:
    """Delete the shared-memory files DeepSpeed's CPU all-reduce left for this run; return them.

    On a CPU accelerator with every rank on one host, each rank maps a 66 MB file
    ``/dev/shm/deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK`` and DeepSpeed 0.19.8 never unlinks
    it: without this every run leaves its ranks' files behind until /dev/shm fills up.
    """
    leftovers = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers


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

"""Multi-node runs: two hosts built on this machine, one DeepSpeed launcher on each.

The hosts are network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2, interface
``dstk0`` in both), so the two nodes talk gloo over a real network link and find each other only
through ``parallel.master_addr``. Node-local storage gives each host its own mount namespace in
which output_dir is a different folder. Building them needs root; without it these tests are
skipped with that reason. The wrapper command-line tests at the end need no root.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from toolkit.checkpoints import store as checkpoint

MASTER = "10.77.0.1"
RECIPE = ["train.max_steps=8", "train.log_steps=1", "train.save_steps=4", "data.eval=null",
          "data.train_limit=2000", "parallel.network_interface=dstk0"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def hosts():
    """Two network namespaces joined by a veth pair; yields their names, node 0 first."""
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.skip("building two hosts from network namespaces needs root and iproute2 (ip, unshare)")
    tag = f"{os.getpid() % 100000}"
    names = [f"dstk{tag}n0", f"dstk{tag}n1"]
    try:
        for name in names:
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("link", "add", f"dv{tag}a", "type", "veth", "peer", "name", f"dv{tag}b")
        for name, end, address in zip(names, "ab", (MASTER, "10.77.0.2")):
            _ip("link", "set", f"dv{tag}{end}", "netns", name)
            _ip("-n", name, "link", "set", f"dv{tag}{end}", "name", "dstk0")
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", "dstk0")
            _ip("-n", name, "link", "set", "dstk0", "up")
        # node-local disks are bind mounts inside a mount namespace of each host's own
        subprocess.run(["ip", "netns", "exec", names[1], "unshare", "-m", "--propagation", "private", "sh", "-c",
                        "mount --bind /tmp /tmp"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        pytest.skip(f"could not build network namespaces here: {err.stderr.strip()}")
    yield names
    for name in names:  # deleting a namespace deletes its end of the veth pair, and with it the pair
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _dstk(*args: str) -> list[str]:
    return [sys.executable, "-m", "toolkit.cli", "train", *args]


def _node(hosts, rank: int, out: Path, *overrides: str, storage: Path | None = None) -> subprocess.Popen:
    """``dstk train --node-rank RANK`` on host RANK; with ``storage``, output_dir is that folder there."""
    argv = _dstk(f"output_dir={out}", *RECIPE, "parallel.nodes=2", f"parallel.master_addr={MASTER}",
                 "parallel.master_port=29610", *overrides, "--node-rank", str(rank))
    if storage is not None:  # a mount namespace of its own, where output_dir is this host's disk
        argv = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                f'mount --bind "{storage}" "{out}" && exec "$@"', "sh", *argv]
    return subprocess.Popen(["ip", "netns", "exec", hosts[rank], *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_host(proc)
        output, _ = proc.communicate()
        raise AssertionError(f"timed out\n{output[-3000:]}") from None
    return proc.returncode, output


def _kill_host(proc: subprocess.Popen) -> None:
    """SIGKILL every process a node started, as a host that loses power (dstk's launcher runs in
    a session of its own, so the tree is followed rather than the process group)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid)
        victims = [tree, *tree.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _wait_for_step(nodes: list, metrics: Path, step: int) -> None:
    deadline = time.monotonic() + 240
    while not metrics.is_file() or max(_losses(metrics), default=0) < step:
        assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), \
            [n.communicate()[0][-2000:] for n in nodes if n.poll() is not None]
        time.sleep(0.05)


def _losses(metrics: Path) -> dict[int, float]:
    """Each step's loss as last logged (a resumed run logs its replayed steps again)."""
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
    return {line["step"]: line["loss"] for line in lines if "loss" in line}


@pytest.fixture(scope="module")
def single_host(hosts, tmp_path_factory) -> dict[int, float]:
    """The per-step losses of the same recipe on one host, 2 ranks, ZeRO-3: what every layout must give."""
    out = tmp_path_factory.mktemp("single-host") / "run"
    proc = subprocess.run(_dstk(f"output_dir={out}", *RECIPE[:-1], "parallel.zero_stage=3"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return _losses(out / "metrics.jsonl")


def _assert_same_losses(got: dict[int, float], want: dict[int, float], rel: float = 1e-5) -> None:
    assert sorted(got) == sorted(want) == list(range(1, 9)), (got, want)
    for step in want:
        assert abs(got[step] - want[step]) <= rel * abs(want[step]), (step, got[step], want[step])


def test_zero3_across_two_hosts_on_node_local_storage_survives_a_host_loss(hosts, single_host, tmp_path):
    """ZeRO-3 over two hosts, each with its own disk: one host dies after step 5, the other stops
    within seconds, both resume from step 4, and the run ends with the single-host run's losses."""
    out, disks = tmp_path / "run", [tmp_path / "disk0", tmp_path / "disk1"]
    for folder in (out, *disks):
        folder.mkdir()
    layout = ("parallel.zero_stage=3", "parallel.node_local_storage=true")
    nodes = [_node(hosts, rank, out, *layout, storage=disks[rank]) for rank in (0, 1)]
    _wait_for_step(nodes, disks[0] / "metrics.jsonl", 5)
    _kill_host(nodes[1])
    killed = time.monotonic()
    code, output = _finish(nodes[0], timeout=120)
    stopped_after = time.monotonic() - killed
    assert code != 0 and "resume=auto --node-rank 0" in output, output[-3000:]
    print(f"node 0 stopped {stopped_after:.1f} s after node 1 was killed")
    assert stopped_after < 30, f"node 0 went on for {stopped_after:.0f} s after node 1 died"
    _finish(nodes[1])
    for rank, disk in enumerate(disks):  # each host published its own ranks' shards of step 4
        latest = checkpoint.newest_complete(disk / "checkpoints")
        assert latest is not None and latest.name == "step_000004"
        assert sorted(p.name for p in latest.glob("rng_state_rank*.pt")) == [f"rng_state_rank{rank:05d}.pt"]
        assert [p.name for p in latest.glob("zero_pp_rank_*_optim_states.pt")] == \
            [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"]

    nodes = [_node(hosts, rank, out, *layout, "resume=auto", storage=disks[rank]) for rank in (0, 1)]
    results = [_finish(node) for node in nodes]
    assert [code for code, _ in results] == [0, 0], [output[-3000:] for _, output in results]
    assert "resumed from" in results[0][1]
    _assert_same_losses(_losses(disks[0] / "metrics.jsonl"), single_host)
    run = json.loads((disks[0] / "run.json").read_text())
    assert run["status"] == "completed" and run["parallel"]["nodes"] == 2
    assert run["parallel"]["network"]["network_interface"] == "dstk0"
    assert (disks[0] / "final" / "model.safetensors").is_file() and not (disks[1] / "final").exists()
    assert json.loads((disks[1] / "run.json").read_text())["audit"]["audited_on"] == "node 0"


def test_pipeline_split_across_two_hosts_resumes_on_shared_storage(hosts, single_host, tmp_path):
    """Stage 0 on one host, stage 1 on the other, one shared output_dir. Node 0 is preempted
    (SIGTERM) after step 5; node 1 stops too; resumed on both, the run ends with the single-host
    losses (its global batch of 2 x 16 records is the pipeline's 2 micro-batches of 16)."""
    out = tmp_path / "run"
    layout = ("parallel.pipeline_stages=2", "train.grad_accum=2")
    nodes = [_node(hosts, rank, out, *layout) for rank in (0, 1)]
    _wait_for_step(nodes, out / "metrics.jsonl", 5)
    nodes[0].send_signal(signal.SIGTERM)  # reaches dstk only, as a scheduler's preemption does
    results = [_finish(node, timeout=120) for node in nodes]
    assert all(code != 0 for code, _ in results), [output[-2000:] for _, output in results]
    assert "resume=auto --node-rank 1" in results[1][1]
    assert checkpoint.newest_complete(out / "checkpoints").name == "step_000004"

    nodes = [_node(hosts, rank, out, *layout, "resume=auto") for rank in (0, 1)]
    results = [_finish(node) for node in nodes]
    assert [code for code, _ in results] == [0, 0], [output[-3000:] for _, output in results]
    _assert_same_losses(_losses(out / "metrics.jsonl"), single_host)
    assert (out / "final" / "model.safetensors").is_file()


def test_a_node_with_another_recipe_is_refused_before_any_worker_starts(hosts, tmp_path):
    out = tmp_path / "run"
    nodes = [_node(hosts, 0, out), _node(hosts, 1, out, "train.lr=0.1")]
    (code0, out0), (code1, out1) = [_finish(node, timeout=120) for node in nodes]
    assert (code0, code1) == (2, 2), (out0[-2000:], out1[-2000:])
    assert "node 1 refuses to start: its recipe (sha256" in out1.splitlines()[-1]
    assert "no node started its workers" in out0.splitlines()[-1]
    assert "spawned with command" not in out0 + out1  # DeepSpeed's launcher never started a worker
    assert not (out / "metrics.jsonl").exists()


# --- the launch/ wrappers: the DeepSpeed command lines they lead to, no cluster needed ---------


def _wrapper(tmp_path: Path, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join([str(Path(sys.executable).parent), str(tmp_path / "bin"), os.environ["PATH"]])
    return subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": path, **(env or {})})


def test_hostfile_wrapper_starts_every_host_through_pdsh(tmp_path):
    (tmp_path / "hosts").write_text("# two nodes\nworker-a slots=2\nworker-b slots=2\n")
    done = _wrapper(tmp_path, str(ROOT / "launch/hostfile.sh"), "hosts", "tiny", "parallel.nodes=2",
                    "parallel.nproc=4", "--dry-run")
    assert done.returncode == 0, done.stderr
    argv = done.stdout.split()
    assert argv[1:5] == ["-m", "deepspeed.launcher.runner", "--log_level", "error"]
    assert argv[5:13] == ["--hostfile", str(tmp_path / "hosts"), "--launcher", "pdsh", "--master_addr", "worker-a",
                          "--master_port", "29500"]
    assert argv[13:] == ["--module", "toolkit.launching.worker", "--run-dir", str(tmp_path / "runs/tiny")]
    assert not (tmp_path / "runs").exists()

    wrong = _wrapper(tmp_path, str(ROOT / "launch/hostfile.sh"), "hosts", "tiny", "parallel.nodes=2")
    assert wrong.returncode == 2
    assert wrong.stderr.strip().endswith("lists 2 host(s) with 4 slot(s), but the recipe sets parallel.nodes=2 "
                                         "parallel.nproc=2 (set parallel.nodes=2 parallel.nproc=4, or edit the hostfile)")


def test_slurm_and_per_node_wrappers_start_one_launcher_per_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # SLURM's own tools as this allocation would answer: two hosts, and srun starting the task of node 1
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-17\\ngpu-18\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
                                  'SLURM_NODEID=1 exec "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    slurm = {"SLURM_JOB_NODELIST": "gpu-[17-18]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4"}
    done = _wrapper(tmp_path, "bash", str(ROOT / "launch/slurm.sbatch"), "tiny", "train.max_steps=5", "--dry-run",
                    env=slurm)
    assert done.returncode == 0, done.stderr
    argv = done.stdout.split()
    assert argv[argv.index("--no_ssh") + 1:argv.index("--module")] == [
        "--node_rank", "1", "--master_addr", "gpu-17", "--master_port", "29500"]
    assert "world: node0 slots=4 node1 slots=4" in done.stderr

    done = _wrapper(tmp_path, str(ROOT / "launch/node.sh"), "0", "2", "10.0.0.5", "tiny", "--dry-run")
    assert done.returncode == 0, done.stderr
    argv = done.stdout.split()
    assert argv[argv.index("--no_ssh") + 1:argv.index("--module")] == [
        "--node_rank", "0", "--master_addr", "10.0.0.5", "--master_port", "29500"]
    assert "world: node0 slots=1 node1 slots=1" in done.stderr

"""The README is executable: every command block in it runs, in order, in one folder, as a user would
run it, so the README cannot drift from the product.

What runs: each ```bash block line by line, each ```python block as a script, each `$ ` line of a
console transcript, and each ```yaml recipe is validated. Where a user would wait for real work,
the command is made smaller, never different:

- runs train a few steps: ``train.max_steps=4`` is appended where a line sets no step count itself,
  a larger count is cut to 12, and the data to its first records (``data.train_limit``,
  ``data.eval_limit``);
- lines that need several hosts (``--node-rank``, a hostfile, SLURM) run with ``--dry-run``, which
  validates everything and prints the launcher command each host would run; ``sbatch`` is a stand-in
  that runs the script as SLURM would on the second node;
- the set-up block's install steps are CI's own (``.ci/run`` runs the test block verbatim, checked
  below); its closing ``dstk train`` runs here.

The hub model the README names (Qwen/Qwen2.5-0.5B) is a tiny Qwen2 in a hub cache made here, read
with HF_HUB_OFFLINE=1: the hub-id path of a real user, without the network. The GSM8K-style data
files the README names are generated.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, user_env

README = (ROOT / "README.md").read_text()
HUB_MODEL = "Qwen/Qwen2.5-0.5B"
TRAINS = ("dstk train", "dstk verify", "launch/train.py", "launch/node.sh", "launch/hostfile.sh", "sbatch ")
SEVERAL_HOSTS = ("--node-rank", "launch/node.sh", "launch/hostfile.sh", "sbatch ")
SMALL_DATA = ["data.train_limit=256", "data.eval_limit=16"]
MOST_STEPS = 12  # the rollback example goes back to step 8 of a run saved every 4 steps


def _blocks() -> list[tuple[int, str, str]]:
    """(line, kind, text) of every fenced block: kind is the fence's language ('' for plain)."""
    return [(README[:m.start()].count("\n") + 1, m.group(1), m.group(2))
            for m in re.finditer(r"```(\w*)\n(.*?)```", README, re.S)]


def _commands(kind: str, text: str) -> list[str]:
    """The shell commands of a block: bash lines (continuations joined), or a transcript's `$ ` lines."""
    if kind == "bash":
        joined = re.sub(r"\\\n\s*", " ", text)
        return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [line[2:] for line in text.splitlines() if line.startswith("$ ")]


def _strip_comment(command: str) -> str:
    return re.sub(r"\s{2,}#.*$", "", command).strip()


def _smaller(command: str) -> str:
    """The command as this test runs it (see the module docstring)."""
    if not command.startswith(TRAINS) and " launch/train.py " not in command:
        return command
    command = re.sub(r"train\.max_steps=(\d+)", lambda m: f"train.max_steps={min(int(m[1]), MOST_STEPS)}", command)
    extra = []
    if "train.max_steps=" not in command and "resume=auto" not in command and not command.startswith("dstk verify"):
        extra.append("train.max_steps=4")
    extra += SMALL_DATA
    if any(marker in command for marker in SEVERAL_HOSTS):
        extra.append("--dry-run")
    if command.startswith("dstk verify") and " --" in command:  # its overrides come before its flags
        head, _, flags = command.partition(" --")
        return f"{head} {' '.join(extra)} --{flags}"
    return f"{command} {' '.join(extra)}"


def _gsm8k_like(count: int, start: int) -> str:
    rows = []
    for n in range(start, start + count):
        a, b = n % 97 + 3, n % 13 + 2
        rows.append({"question": f"Tom has {a} apples and buys {b} bags of {n % 7 + 2} more. How many apples now?",
                     "answer": f"He buys {b} * {n % 7 + 2} = {b * (n % 7 + 2)} apples.\n#### {a + b * (n % 7 + 2)}"})
    return "".join(json.dumps(row) + "\n" for row in rows)


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    """The folder the README's commands run in, and their environment."""
    from toolkit.models.presets import build_preset

    folder = tmp_path_factory.mktemp("readme")
    (folder / "data").mkdir()
    (folder / "data" / "train.jsonl").write_text(_gsm8k_like(400, 0))
    (folder / "data" / "test.jsonl").write_text(_gsm8k_like(40, 1000))
    (folder / "data" / "benchmark.jsonl").write_text(_gsm8k_like(20, 2000))
    (folder / "launch").symlink_to(ROOT / "launch")
    repo = folder / "hub" / f"models--{HUB_MODEL.replace('/', '--')}"
    build_preset("tiny-qwen2", repo / "snapshots" / ("0" * 40), seed=0)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    bin_dir = folder / "bin"  # SLURM, as the second node of a 2-node allocation sees it
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-17\\ngpu-18\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nSLURM_NODEID=1 exec "$@"\n')
    (bin_dir / "sbatch").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; shift; done\n'
                                    'SLURM_JOB_NODELIST="gpu-[17-18]" SLURM_NNODES=2 SLURM_GPUS_ON_NODE=8 exec bash "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = user_env(HF_HUB_CACHE=str(folder / "hub"), HF_HUB_OFFLINE="1", PATH=path)
    return folder, env


def _run(command: str, folder: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, cwd=folder, env=env, capture_output=True, text=True, timeout=900)


def _steps() -> list[tuple[int, str, str]]:
    """(README line, kind, what runs) for every runnable piece, in README order."""
    steps, seen = [], set()
    for line, kind, text in _blocks():
        if kind == "yaml":
            steps.append((line, "yaml", text))
        elif kind == "python":
            steps.append((line, "python", re.sub(r"train\.max_steps=\d+", "train.max_steps=4", text)))
        elif "pip install" in text:  # the set-up blocks: CI runs the install; the default run runs here
            tail = text.strip().rsplit("&&", 1)[-1].strip()
            if tail.startswith("dstk"):
                steps.append((line, "bash", _smaller(tail)))
                seen.add(tail)
        else:
            for command in map(_strip_comment, _commands(kind, text)):
                if command not in seen:  # a transcript of a command run above shows its output
                    seen.add(command)
                    steps.append((line, "bash", _smaller(command)))
    return steps


def test_the_readme_runs_from_top_to_bottom(tour):
    folder, env = tour
    ran = []
    for line, kind, what in _steps():
        if kind == "yaml":
            from toolkit.recipe import load_recipe

            (folder / "example.yaml").write_text(what)
            load_recipe(folder / "example.yaml")
            continue
        if kind == "python":
            (folder / "snippet.py").write_text(what)
            what = f"{shlex.quote(sys.executable)} snippet.py"
        done = _run(what, folder, env)
        assert done.returncode == 0, f"README line {line}: {what}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        ran.append(what)
    assert len(ran) >= 30, ran  # every block was found
    assert (folder / "runs" / "my_recipe" / "final" / "model.safetensors").is_file()
    assert json.loads((folder / "runs" / "my_recipe" / "run.json").read_text())["model"]["name"] == HUB_MODEL


def test_ci_runs_the_readme_test_command_verbatim():
    block = next(text for _, kind, text in _blocks() if kind == "bash" and "python -m pytest" in text)
    assert block.strip().split("&& ", 1)[1] in (ROOT / ".ci" / "run").read_text()

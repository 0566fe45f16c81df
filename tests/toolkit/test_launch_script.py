"""`deepspeed launch/train.py --recipe R` runs a recipe directly: ZeRO-3, bf16, a thread pool per
rank of its share of the cores, clean exit, and its final/ exports to a verified int8 model; a plain
script calling `toolkit.finetune` trains on one rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, user_env
from toolkit.launching.launcher import free_port
from toolkit.training.shm_collectives import usable_cores


def test_launch_script_trains_zero3_bf16_and_every_rank_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}  # as a user's shell
    proc = subprocess.run(
        # its own port: the README's test runs the same launcher on DeepSpeed's default one
        [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
         "launch/train.py",
         "--recipe", "tiny", f"output_dir={out}", "parallel.zero_stage=3", "train.precision=bf16",
         "train.max_steps=4", "train.log_steps=1", "data.eval_limit=32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "terminate called" not in output and "exits with return code" not in output
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["audit"]["verdict"] == "pass"  # rank 0 ran the gate
    assert run["result"]["threads_per_rank"] == [max(1, usable_cores() // 2)] * 2  # not a thread per core each
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 4 and all(l == l and l > 0 for l in losses)  # finite, logged every step

    exported = subprocess.run([sys.executable, "-m", "toolkit.cli", "export", str(out), "--quant", "int8",
                               "-o", str(tmp_path / "int8")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "int8" / "export.json").is_file()


def test_a_plain_script_trains_on_one_rank_whatever_the_recipe_says(tmp_path):
    """The README's Python API snippet, run with `python` and no launcher (the recipe says 2 ranks)."""
    script = ("import toolkit\n"
              f"result = toolkit.finetune('tiny', ['train.max_steps=3', 'train.log_steps=1', 'data.train_limit=200', "
              f"'data.eval_limit=8', 'output_dir={tmp_path / 'run'}'])\n"
              "print('steps', result.steps, len(result.losses))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=user_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps 3 3" in proc.stdout and "one rank: training on it alone (parallel.nproc 2 -> 1)" in proc.stderr
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["parallel"]["nproc"] == 1 and run["status"] == "completed"

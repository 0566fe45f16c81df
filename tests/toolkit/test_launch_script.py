"""`deepspeed launch/train.py --recipe R` runs a recipe directly: ZeRO-3, bf16, clean exit, and
its final/ exports to a verified int8 model."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_launch_script_trains_zero3_bf16_and_every_rank_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "launch/train.py",
         "--recipe", "tiny", f"output_dir={out}", "parallel.zero_stage=3", "train.precision=bf16",
         "train.max_steps=4", "train.log_steps=1", "data.eval_limit=32"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "terminate called" not in output and "exits with return code" not in output
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["audit"]["verdict"] == "pass"  # rank 0 ran the gate
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 4 and all(l == l and l > 0 for l in losses)  # finite, logged every step

    exported = subprocess.run([sys.executable, "-m", "toolkit.cli", "export", str(out), "--quant", "int8",
                               "-o", str(tmp_path / "int8")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "int8" / "export.json").is_file()


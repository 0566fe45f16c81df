"""Whole runs on one GPU: the built-in default, and a 100M LLaMA in bf16 under ZeRO 0-3 and QLoRA NF4.

Each lives the layout matrix's life (benchmarks/layout_matrix.py) on one rank: train with a
checkpoint at steps 3 and 6, final/ reloaded to the engine's logits, rolled back to step 3 and
resumed to the same losses, `dstk export --quant nf4` verified. run.json says the GPU path ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import layout_matrix as matrix
from tests.conftest import run_dstk
from tests.gpu.conftest import ON_GPU, record


def live(combo: dict, out: Path, *extra: str) -> dict:
    """The combination's whole life on one rank; its run.json."""
    stages = matrix.run_combo(matrix.full(combo), out, timeout=300, extra=("parallel.nproc=1", *extra), nproc=1)
    assert stages == dict.fromkeys(matrix.STAGES, "pass"), (out / "log.txt").read_text()[-4000:]
    run = json.loads((out / "run" / "run.json").read_text())
    runtime, result = run["runtime"], run["result"]
    assert runtime["accelerator"].startswith("cuda" if ON_GPU else "cpu")
    assert runtime["comm_backend"] == ("nccl" if ON_GPU else "gloo")
    assert runtime["optimizer"] == "torch.optim.adamw.AdamW (fused)"
    if ON_GPU:  # the CPU-only measures stay off
        assert not result["shm_collectives"] and not result["kept_zero_buffers"] and result["peak_gpu_mb_per_rank"][0] > 0
    lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    speed = [line["tokens_per_s"] for line in lines if "tokens_per_s" in line]
    record(matrix.short(matrix.full(combo)), runtime=", ".join(map(str, runtime.values())), losses=[line["loss"] for line in lines if "loss" in line],
           tokens_per_s=speed[-1] if speed else None, peak_gpu_mb=result.get("peak_gpu_mb_per_rank"))
    return run


def test_the_built_in_default_lives_a_whole_run(tmp_path):
    run = live({}, tmp_path)
    assert run["runtime"]["attention"] == "sdpa"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_100m_llama_in_bf16_lives_a_whole_run_under_zero(stage, llama_100m, tmp_path):
    live({"parallel.zero_stage": stage, "train.precision": "bf16"}, tmp_path, f"model={llama_100m}")


@pytest.mark.parametrize("stage", [1, 3])
def test_qlora_nf4_on_a_100m_llama_lives_a_whole_run(stage, llama_100m, tmp_path):
    """The frozen base quantized by bitsandbytes' CUDA kernels on the GPU, adapters trained in bf16."""
    live({"parallel.zero_stage": stage, "train.precision": "bf16", "adapters": "qlora-nf4"}, tmp_path,
         f"model={llama_100m}")


def test_more_ranks_than_gpus_are_refused_before_any_worker(tmp_path):
    if not ON_GPU:
        pytest.skip("a CPU runs any number of ranks")
    gpus = torch.cuda.device_count()
    done = run_dstk("train", f"parallel.nproc={gpus + 1}", f"output_dir={tmp_path / 'run'}", timeout=120)
    assert done.returncode == 2 and f"set parallel.nproc={gpus}" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()

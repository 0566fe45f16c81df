"""Every parallel layout on 2 CPU ranks trains exactly like one rank, and final/ reloads as it.

One rank accumulating 2 micro-batches, 2 data-parallel ranks (ZeRO 0-3) with 1 each, and a 2-stage
pipeline or 2-way tensor parallelism (1 data-parallel rank, 2 micro-batches) all see the same
global batches, so their per-step losses must agree.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.multirank import run_deepspeed
from toolkit.training.shm_collectives import usable_cores

WORKER = Path(__file__).parent / "workers" / "finetune_layouts.py"
# 5 logged steps, no eval, no mid-run checkpoint: only the maths of the step is compared, so the
# audit (tested on its own) is off, and 2,000 records are more than 5 steps draw
COMMON = ["train.max_steps=5", "train.log_steps=1", "train.warmup_ratio=0.2", "train.micro_batch_size=4",
          "data.eval=null", "train.save_steps=0", "audit.enforce=false", "data.train_limit=2000"]
TWO_RANK_LAYOUTS = {
    "zero0": "parallel.zero_stage=0,train.grad_accum=1",
    "zero1": "parallel.zero_stage=1,train.grad_accum=1",
    "zero2": "parallel.zero_stage=2,train.grad_accum=1",
    "zero3": "parallel.zero_stage=3,train.grad_accum=1,train.save_steps=3",
    # packed rows (room for 3-4 records each; none is longer than 32 tokens): the same records
    # per step, so the same losses as the padded reference
    "zero2_packed": "parallel.zero_stage=2,train.grad_accum=1,train.packing=true,train.seq_len=96",
    # compiled (inductor): padded micro-batches of varying width (eager attention), and packed ones
    # whose tokens and rows vary: the same maths
    "zero1_compiled": "parallel.zero_stage=1,train.grad_accum=1,train.compile=true",
    "zero2_packed_compiled": "parallel.zero_stage=2,train.grad_accum=1,train.packing=true,train.seq_len=96,"
                             "train.compile=true",
    # bf16 with 2 micro-batches per step, accumulated in the template's fp32 gradient partition
    "zero2_bf16": "parallel.zero_stage=2,train.grad_accum=2,train.micro_batch_size=2,train.precision=bf16",
    "pipe2": "parallel.zero_stage=0,parallel.pipeline_stages=2,train.grad_accum=2,train.save_steps=3",
    # audited: its export below must record the verdict in its lineage
    "pipe2_tied": "model=tiny-qwen2,parallel.zero_stage=1,parallel.pipeline_stages=2,train.grad_accum=2,audit.enforce=true",
    "tp2": "parallel.zero_stage=1,parallel.tensor_parallel=2,train.grad_accum=2",
    # AutoTP on the other untied families (tied ones are refused, see test_layout)
    "tp2_mistral": "model=tiny-mistral,parallel.zero_stage=0,parallel.tensor_parallel=2,train.grad_accum=2",
    "tp2_gpt-neox": "model=tiny-gpt-neox,parallel.zero_stage=0,parallel.tensor_parallel=2,train.grad_accum=2",
    "tp2_phi": "model=tiny-phi,parallel.zero_stage=0,parallel.tensor_parallel=2,train.grad_accum=2",
}
REFERENCES = {"single": "parallel.zero_stage=0,train.grad_accum=2",
              "single_tied": "model=tiny-qwen2,parallel.zero_stage=0,train.grad_accum=2",
              "single_mistral": "model=tiny-mistral,parallel.zero_stage=0,train.grad_accum=2",
              "single_gpt-neox": "model=tiny-gpt-neox,parallel.zero_stage=0,train.grad_accum=2",
              "single_phi": "model=tiny-phi,parallel.zero_stage=0,train.grad_accum=2"}


def _layouts(mapping):
    return [arg for name, spec in mapping.items() for arg in ("--layout", f"{name}={spec}")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return run_deepspeed(WORKER, out, *_layouts(REFERENCES), *COMMON, nproc=1)[0]


@pytest.fixture(scope="module")
def layouts_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module")
def two_ranks(layouts_dir):
    return run_deepspeed(WORKER, layouts_dir, *_layouts(TWO_RANK_LAYOUTS), "--resume", "pipe2:3", "--resume", "zero3:3",
                         *COMMON,
                         nproc=2, timeout=1200)


def _reference_for(name):
    family = name.rpartition("_")[2] if "_" in name else ""
    return f"single_{family}" if f"single_{family}" in REFERENCES else "single"


FP32_LAYOUTS = [name for name in TWO_RANK_LAYOUTS if "bf16" not in name]


@pytest.mark.parametrize("layout", FP32_LAYOUTS)
def test_layout_losses_match_single_rank(reference, two_ranks, layout):
    expected = reference[_reference_for(layout)]["losses"]
    assert len(expected) == 5 and expected[-1] < expected[0]
    for rank in two_ranks:
        assert rank[layout]["losses"] == pytest.approx(expected, rel=1e-5)


def test_bf16_layout_trains_as_the_fp32_single_rank(reference, two_ranks):
    """Within bf16's precision (measured: 5e-4), 10x tighter than a step moves the loss; gradients
    accumulated in fp32, as the ZeRO-2 template asks (toolkit/ds_configs/zero2.json)."""
    expected = reference["single"]["losses"]
    for rank in two_ranks:
        assert rank["zero2_bf16"]["losses"] == pytest.approx(expected, rel=5e-3)
        assert rank["zero2_bf16"]["grad_accum_dtype"] == "torch.float32"


@pytest.mark.parametrize("layout", FP32_LAYOUTS)
def test_final_reloads_to_the_same_model_as_single_rank(reference, two_ranks, layout):
    mine = torch.tensor(two_ranks[0][layout]["final_logits"])
    expected = torch.tensor(reference[_reference_for(layout)]["final_logits"])
    assert ((mine - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_layouts_ran_packed_and_compiled_as_asked(two_ranks):
    """What the packed and compiled layouts' matching losses are worth: they really ran so."""
    for rank in two_ranks:
        assert rank["zero1_compiled"]["compiled"] and rank["zero2_packed_compiled"]["compiled"]
        assert not rank["zero2_packed"]["compiled"] and not rank["zero2"]["compiled"]
        assert rank["zero2_packed"]["attention"] == rank["zero2_packed_compiled"]["attention"] == "dstk_packed"
        assert rank["zero1_compiled"]["attention"] == "eager" and rank["zero2"]["attention"] == "sdpa"


def test_layouts_ran_over_shared_memory_collectives(two_ranks):
    """The matching losses above are those of the routed collectives (toolkit/shm_collectives.py);
    ZeRO-3, run after ZeRO-2 in the same process, is not routed."""
    for rank in two_ranks:
        assert {name: layout["shm_collectives"] for name, layout in rank.items()} == \
            {name: usable_cores() >= 2 and "zero_stage=3" not in spec for name, spec in TWO_RANK_LAYOUTS.items()}


def test_bf16_zero2_ran_with_its_gradient_buffers_kept(two_ranks):
    """The bf16 layout's matching losses are those of DeepSpeed's ZeRO-2 optimizer reusing its
    bucket and fp32 gradient partition across steps (toolkit/host_memory.py); fp32 runs keep none."""
    for rank in two_ranks:
        assert [name for name, layout in rank.items() if layout["kept_zero_buffers"]] == ["zero2_bf16"]


@pytest.mark.parametrize("layout", ["pipe2", "zero3"])
def test_run_resumes_from_its_own_checkpoint(two_ranks, layout):
    """Rolled back to step 3 and resumed, steps 4-5 repeat the uninterrupted run's losses (ZeRO-1 and
    LoRA resumes: test_fault_injection.py, test_lora.py)."""
    for rank in two_ranks:
        assert rank[layout]["resumed_losses"] == pytest.approx(rank[layout]["losses"][3:], rel=1e-6)


@pytest.mark.parametrize("layout", ["zero0", "zero3", "pipe2", "tp2"])
def test_every_logged_step_reports_its_communication_share(reference, two_ranks, layout):
    shares = two_ranks[0][layout]["comm_shares"]
    assert len(shares) == 5 and all(0 < share < 1 for share in shares)
    # a single rank has no one to talk to: its share is DeepSpeed's bookkeeping, below any 2-rank one
    alone = reference["single"]["comm_shares"]
    assert max(alone) < min(shares), (alone, shares)


@pytest.mark.parametrize("layout", ["zero0", "zero3", "tp2", "tp2_mistral", "tp2_gpt-neox", "tp2_phi"])
def test_final_reloads_to_trained_engine_logits(two_ranks, layout):
    assert two_ranks[0][layout]["final_vs_engine"] < 1e-5


def test_tied_embeddings_survive_the_pipeline_split(two_ranks):
    assert two_ranks[0]["pipe2_tied"]["tied"]


@pytest.mark.parametrize("layout", ["zero3", "pipe2", "tp2"])
def test_each_rank_holds_about_half_the_model(two_ranks, layout):
    full = two_ranks[0][layout]["full_numel"]
    for rank in two_ranks:
        # small parameters (norms, biases) stay whole on every rank
        assert 0.35 * full < rank[layout]["local_numel"] < 0.65 * full
    assert two_ranks[0]["zero3"]["partitioned"] and not two_ranks[0]["zero0"]["partitioned"]


def test_pipeline_run_exports_to_a_verified_nf4_model(two_ranks, layouts_dir):
    run = layouts_dir / "pipe2_tied"
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "export", str(run), "--quant", "nf4",
                           "-o", str(run / "nf4")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run / "nf4" / "export.json").read_text())
    assert report["lineage"]["run"]["audit"]["verdict"] == "pass"


def test_zero3_run_exports_to_a_verified_fp4_model(two_ranks, layouts_dir, tmp_path):
    from data_checks.files import sha256_file

    run = layouts_dir / "zero3"
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "export", str(run), "--quant", "fp4",
                           "-o", str(tmp_path / "fp4")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "fp4" / "export.json").read_text())
    assert report["verification"]["reload_vs_memory"] <= 1e-5 and report["quantization"]["quantized_modules"] == 28
    assert report["lineage"]["run_json_sha256"] == sha256_file(run / "run.json")


@pytest.mark.parametrize("layout", ["zero0", "zero1", "zero3", "pipe2_tied"])
def test_newest_checkpoint_consolidates_offline_to_the_same_model(two_ranks, layouts_dir, layout, tmp_path):
    """A run without final/ (stopped early) exports from its newest checkpoint instead."""
    from transformers import AutoModelForCausalLM

    from toolkit.checkpoints.consolidate import consolidate_offline

    run = tmp_path / layout
    shutil.copytree(layouts_dir / layout, run, ignore=shutil.ignore_patterns("final", "nf4"))
    folder = consolidate_offline(run)
    probe = torch.arange(24).view(2, 12) * 7 % 90 + 5
    with torch.no_grad():
        offline = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=probe).logits
    expected = torch.tensor(two_ranks[0][layout]["final_logits"])
    assert ((offline - expected).abs().max() / expected.abs().max()).item() < 1e-5

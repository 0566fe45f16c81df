"""LoRA and QLoRA on 2 CPU ranks: every ZeRO stage and a pipeline train the adapters like one rank.

The same worker as the layout parity test (``workers/finetune_layouts.py``) trains the built-in
default with adapters under each layout; one rank accumulating 2 micro-batches is the reference.
"""

from pathlib import Path

import pytest
import torch

from tests.multirank import run_deepspeed

WORKER = Path(__file__).parent / "workers" / "finetune_layouts.py"
# dropout off so that every layout draws the same (no) random masks; a high lr so that adapters on
# the tiny random base move the loss within 5 steps; no audit (tested on its own) and 2,000 records
COMMON = ["train.max_steps=5", "train.log_steps=1", "train.warmup_ratio=0.2", "train.micro_batch_size=4",
          "train.lr=1e-2", "data.eval=null", "train.save_steps=0", "lora.enabled=true", "lora.dropout=0",
          "audit.enforce=false", "data.train_limit=2000"]
LORA = {f"lora_zero{stage}": f"parallel.zero_stage={stage}" for stage in range(4)}
LORA["lora_zero2"] += ",train.save_steps=3,lora.merge=true"  # resumed from step 3 below
LORA["lora_zero3_offload"] = "parallel.zero_stage=3,parallel.offload=cpu"  # DeepSpeed's CPU Adam
# adapters inside pipeline stages, the tie of tiny-qwen2's embeddings kept across the split
PIPELINES = {"lora_pipe2": "parallel.zero_stage=0,parallel.pipeline_stages=2",
             "lora_pipe2_tied": "model=tiny-qwen2,parallel.zero_stage=1,parallel.pipeline_stages=2"}
QLORA = {"qlora_nf4_zero2": "lora.quantize_base=nf4,parallel.zero_stage=2",
         "qlora_nf4_zero3": "lora.quantize_base=nf4,parallel.zero_stage=3",
         "qlora_int8_zero2": "lora.quantize_base=int8,parallel.zero_stage=2"}
REFERENCES = {"single_lora": "parallel.zero_stage=0",
              "single_lora_tied": "model=tiny-qwen2,parallel.zero_stage=0",
              "single_qlora_nf4": "lora.quantize_base=nf4,parallel.zero_stage=0",
              "single_qlora_int8": "lora.quantize_base=int8,parallel.zero_stage=0"}
REFERENCE_OF = {**{name: "single_lora" for name in LORA}, "lora_pipe2": "single_lora",
                "lora_pipe2_tied": "single_lora_tied", "qlora_nf4_zero2": "single_qlora_nf4",
                "qlora_nf4_zero3": "single_qlora_nf4", "qlora_int8_zero2": "single_qlora_int8"}
MODULE_DRIVEN = [name for name in REFERENCE_OF if name not in PIPELINES]


def _layouts(mapping, grad_accum):
    return [arg for name, spec in mapping.items() for arg in ("--layout", f"{name}={spec},train.grad_accum={grad_accum}")]


def _relative_error(mine, expected) -> float:
    mine, expected = torch.as_tensor(mine), torch.as_tensor(expected)
    return ((mine - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_deepspeed(WORKER, tmp_path_factory.mktemp("lora_ref"), *_layouts(REFERENCES, 2), *COMMON, nproc=1)[0]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def two_ranks(runs_dir):
    # one data-parallel rank in a 2-stage pipeline accumulates 2 micro-batches, like the reference
    return run_deepspeed(WORKER, runs_dir, *_layouts({**LORA, **QLORA}, 1), *_layouts(PIPELINES, 2),
                         "--resume", "lora_zero2:3", *COMMON, nproc=2,
                         timeout=1200)


@pytest.mark.parametrize("layout", list(REFERENCE_OF))
def test_adapter_losses_match_single_rank_and_fall(reference, two_ranks, layout):
    expected = reference[REFERENCE_OF[layout]]["losses"]
    assert len(expected) == 5 and expected[-1] < expected[0]
    for rank in two_ranks:
        assert rank[layout]["losses"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("layout", MODULE_DRIVEN)
def test_saved_adapter_reloads_onto_its_base_with_the_trained_logits(two_ranks, layout):
    assert two_ranks[0][layout]["final_vs_engine"] < 1e-5


@pytest.mark.parametrize("layout", list(REFERENCE_OF))
def test_saved_adapter_is_the_one_a_single_rank_trains(reference, two_ranks, layout):
    expected = reference[REFERENCE_OF[layout]]["final_logits"]
    assert _relative_error(two_ranks[0][layout]["final_logits"], expected) < 1e-5


def test_tied_embeddings_survive_adapters_in_a_pipeline(two_ranks):
    assert two_ranks[0]["lora_pipe2_tied"]["tied"]


def test_quantized_base_under_zero3_is_partitioned(two_ranks):
    assert two_ranks[0]["qlora_nf4_zero3"]["partitioned"] and two_ranks[0]["lora_zero3"]["partitioned"]


def test_resumed_adapter_run_continues_exactly(two_ranks):
    """Rolled back to step 3 and resumed, steps 4-5 repeat the uninterrupted run's losses."""
    for rank in two_ranks:
        assert rank["lora_zero2"]["resumed_losses"] == pytest.approx(rank["lora_zero2"]["losses"][3:], rel=1e-6)


def test_checkpoint_holds_the_adapters_and_not_the_frozen_base(two_ranks, runs_dir):
    folder = runs_dir / "lora_zero2" / "checkpoints" / "step_000003"
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    assert states["module"] and all(".lora_" in key for key in states["module"])
    base = runs_dir / "lora_zero2" / "base_model" / "model.safetensors"
    saved = sum(f.stat().st_size for f in folder.iterdir())
    assert saved < 0.2 * base.stat().st_size  # adapters, their Adam moments and fp32 copies only


def test_merged_model_is_a_plain_model_with_the_adapter_logits(two_ranks, runs_dir):
    from transformers import AutoModelForCausalLM

    merged = runs_dir / "lora_zero2" / "final" / "merged"
    assert not (merged / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    probe = torch.arange(24).view(2, 12) * 7 % 90 + 5  # the worker's probe
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    assert _relative_error(logits, two_ranks[0]["lora_zero2"]["final_logits"]) < 1e-5


def test_lora_run_exports_merged_and_verified(two_ranks, runs_dir, tmp_path):
    """`dstk export RUN` merges the run's adapter into its full-precision base before quantizing."""
    import json
    import subprocess
    import sys

    out = tmp_path / "nf4"
    proc = subprocess.run([sys.executable, "-m", "toolkit.cli", "export", str(runs_dir / "lora_zero1"), "--quant",
                           "nf4", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "export.json").read_text())
    assert report["lineage"]["adapter_dir"].endswith("lora_zero1/final")
    assert report["lineage"]["run"]["lora"]["enabled"]

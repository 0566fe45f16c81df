"""Export and generation on the GPU: NF4/FP4/int8 exports through bitsandbytes' CUDA kernels that
reload as the model that was saved, and batched generation with the KV cache on a full and an NF4 model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.conftest import run_dstk
from tests.gpu.conftest import ON_GPU, record
from toolkit import inference

PROMPTS = [f"reverse {''.join(random.Random(i).choices('0123456789', k=3 + i % 4))} =" for i in range(8)]


def export(model: Path, quant: str, out: Path) -> dict:
    done = run_dstk("export", model, "--quant", quant, "-o", out, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "export.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """The built-in default trained as a user runs it on one GPU (`dstk train parallel.nproc=1`),
    and its final/ exported to NF4."""
    root = tmp_path_factory.mktemp("default")
    done = run_dstk("train", "parallel.nproc=1", f"output_dir={root / 'run'}", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    export(root / "run" / "final", "nf4", root / "nf4")
    return {"full": root / "run" / "final", "nf4": root / "nf4"}


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_an_export_reloads_as_the_model_that_was_saved(quant, llama_100m, tmp_path):
    report = export(llama_100m, quant, tmp_path / quant)
    check = report["verification"]
    assert check["reload_vs_memory"] <= check["tolerance"]
    loaded = inference.load(tmp_path / quant)
    layers = {type(m).__name__ for m in loaded.model.modules()}
    assert ("Linear8bitLt" if quant == "int8" else "Linear4bit") in layers
    assert loaded.model.device.type == ("cuda" if ON_GPU else "cpu")
    record(f"export {quant}", reload_vs_memory=check["reload_vs_memory"], quantized_vs_source=check["quantized_vs_source"],
           disk_vs_source=report["size"]["disk_bytes"] / report["size"]["source_disk_bytes"],
           seconds=report["time_s"]["total"])


@pytest.mark.xdist_group("trained")  # one lane trains the default once for both
@pytest.mark.parametrize("which", ["full", "nf4"])
def test_batched_generation_with_the_kv_cache(which, trained):
    """The cache gives the tokens recomputing gives; a left-padded batch gives each prompt its own."""
    model = inference.load(trained[which])
    cached = inference.generate(model, PROMPTS, max_new_tokens=8)
    uncached = inference.generate(model, PROMPTS, max_new_tokens=8, use_cache=False)
    alone = [inference.generate(model, prompt, max_new_tokens=8).token_ids[0] for prompt in PROMPTS]
    assert cached.token_ids == uncached.token_ids == alone
    right = sum(text.strip() == prompt.split()[1][::-1] for text, prompt in zip(cached.texts, PROMPTS))
    record(f"generate {which}", device=str(model.model.device), reversed_right=f"{right}/{len(PROMPTS)}",
           cached_tokens_per_s=cached.tokens_per_s, uncached_tokens_per_s=uncached.tokens_per_s)
    if which == "full":
        assert right >= len(PROMPTS) // 2, cached.texts  # the default run learned its task


def test_batched_generation_speed_on_a_100m_model(llama_100m, tmp_path):
    """Batched greedy generation of 128 tokens on the full and the NF4 100M model, with and without the cache."""
    export(llama_100m, "nf4", tmp_path / "nf4")
    prompts = [p * 4 for p in PROMPTS]
    for which, folder in (("full", llama_100m), ("nf4", tmp_path / "nf4")):
        model = inference.load(folder)
        cached = inference.generate(model, prompts, max_new_tokens=128)
        uncached = inference.generate(model, prompts, max_new_tokens=128, use_cache=False)
        assert cached.new_tokens > 0 and uncached.new_tokens > 0
        record(f"generate 100M {which}", batch=len(prompts), cached_tokens_per_s=cached.tokens_per_s,
               uncached_tokens_per_s=uncached.tokens_per_s)

"""Quantized export: nf4 / fp4 / int8 exports reload as the model that was saved, damage is caught,
bad input exits 2 with one line, and export.json says what it claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu
from transformers import AutoModelForCausalLM

from data_checks.files import sha256_file
from tests.conftest import run_dstk, user_env
from toolkit import inference
from toolkit.cli import main as cli_main
from toolkit.errors import UserError
from toolkit.exporting import probe, quantize
from toolkit.exporting.export import MAX_STEP_RATIO, RELOAD_TOLERANCE, export
from toolkit.exporting.probe import probe_ids, probe_logits, relative_error
from toolkit.models.presets import build_preset

TEXT = "the quick brown fox jumps over the lazy dog. "
EVAL_ROWS = [
    {"prompt": "the quick brown ", "response": "fox jumps"},
    {"prompt": "the lazy ", "response": "dog."},
    {"prompt": "question: 2+2? ", "response": "four #### 4"},
]


def _trained(preset: str, folder: Path, steps: int = 8) -> Path:
    """A tiny preset trained a few AdamW steps, so its weights are not just the initialisation."""
    build_preset(preset, folder, seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = inference.load(folder).tokenizer([TEXT * 3] * 2, return_tensors="pt")["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return _trained("tiny-llama", tmp_path_factory.mktemp("src") / "llama")


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in EVAL_ROWS))
    return path


def _assert_faithful_export(out: Path, source_dir: Path, quant: str, double_quant: bool) -> dict:
    """Checks every export must pass; returns its export.json."""
    report = json.loads((out / "export.json").read_text())
    check = report["verification"]
    assert check["reload_vs_memory"] <= RELOAD_TOLERANCE
    assert check["weights"]["max_step_ratio"] <= MAX_STEP_RATIO
    assert report["files"] == {
        p.relative_to(out).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != "export.json"
    }
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "scratch left behind"
    # Loaded here, as a user would, the export has the asked-for layers and reproduces the
    # in-memory model's distance from the source that the export measured.
    reloaded = inference.load(out).model
    layers = quantize.quantized_modules(reloaded).values()
    assert layers and all("lm_head" not in name for name in quantize.quantized_modules(reloaded))
    if quant == "int8":
        assert all(isinstance(m, bnb.nn.Linear8bitLt) for m in layers)
    else:
        assert {(m.weight.quant_state.quant_type, m.weight.quant_state.nested) for m in layers} == {(quant, double_quant)}
    source = inference.load(source_dir).model
    ids = probe_ids(source.config.vocab_size, 32)
    distance = relative_error(probe_logits(reloaded, ids), probe_logits(source, ids))
    assert distance == pytest.approx(check["quantized_vs_source"], rel=1e-4)
    assert 0 < distance < 0.5
    return report


# nf4 with double quantization, the default, is exported from GPT-2 and from a LoRA adapter below.
@pytest.mark.parametrize(("quant", "double_quant"), [("nf4", False), ("fp4", True), ("fp4", False)])
def test_4bit_export_reloads_as_the_saved_model(llama, eval_file, tmp_path, quant, double_quant):
    result = export(llama, quant, tmp_path / "out", double_quant=double_quant, eval_data=eval_file, answer_match=True)
    report = _assert_faithful_export(result.out_dir, llama, quant, double_quant)
    size, quality = report["size"], report["quality"]
    assert size["quantized_weights_fp16_ratio"] <= 0.30
    assert size["disk_ratio"] < 0.3 and size["memory_ratio"] < 0.3  # fp32 source
    assert quality["before"]["examples"] == 3 and quality["before"]["answered"] == 3
    assert abs(quality["loss_change"]) < 0.05
    assert report["quantization"]["quantized_modules"] == 28  # 7 linear layers x 4 blocks
    assert report["eval_data"]["sha256"] == sha256_file(eval_file)


@pytest.fixture(scope="module")
def outlier_llama(llama, tmp_path_factory) -> Path:
    """The trained llama with one large weight in every 64-block of one layer: 4-bit blockwise
    quantization then rounds that layer's other weights to a few levels, and it alone hurts."""
    folder = tmp_path_factory.mktemp("src") / "outliers"
    model = AutoModelForCausalLM.from_pretrained(llama)
    with torch.no_grad():
        weight = model.get_submodule(HURT_LAYER).weight.view(-1)
        weight[::64] = 30 * weight.std()
    model.save_pretrained(folder)
    inference.load(llama).tokenizer.save_pretrained(folder)
    return folder


HURT_LAYER = "model.layers.1.mlp.down_proj"


def test_a_loss_budget_keeps_the_layers_quantization_hurts_most_in_full_precision(outlier_llama, eval_file, tmp_path):
    plain = export(outlier_llama, "fp4", tmp_path / "plain", double_quant=False, eval_data=eval_file).report
    rise = plain["quality"]["loss_change"]
    assert rise > 0.0005, rise

    result = export(outlier_llama, "fp4", tmp_path / "kept", double_quant=False, eval_data=eval_file,
                    max_loss_rise=rise / 4)

    report = _assert_faithful_export(result.out_dir, outlier_llama, "fp4", False)
    search, quantization = report["quantization"]["keep_search"], report["quantization"]
    assert search["kept"][0] == HURT_LAYER and len(search["kept"]) < 28
    assert quantization["keep_fp"] == ["lm_head", *search["kept"]]
    assert quantization["quantized_modules"] == 28 - len(search["kept"])
    assert HURT_LAYER not in quantize.quantized_modules(inference.load(result.out_dir).model)
    # the budget holds on the export itself, quantized afresh and reloaded, not only in the search
    assert report["quality"]["loss_change"] <= rise / 4
    assert search["final_loss"] == pytest.approx(report["quality"]["after"]["loss"], rel=1e-5)
    gains = list(search["gains"].values())
    assert gains == sorted(gains, reverse=True) and list(search["gains"])[: len(search["kept"])] == search["kept"]


def test_int8_export_of_a_run_through_the_cli_records_lineage(llama, eval_file, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "audit").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"recipe_sha256": "abc", "data": {"train": {"sha256": "def"}}}))
    (run / "audit" / "report.json").write_text(json.dumps({"verdict": "pass", "findings": []}))
    os.symlink(llama, run / "final")

    assert cli_main(["export", str(run), "--quant", "int8", "--eval-data", str(eval_file)]) == 0

    report = _assert_faithful_export(run / "export-int8", llama, "int8", False)
    assert report["quantization"]["double_quant"] is False
    assert report["lineage"]["run_json_sha256"] == sha256_file(run / "run.json")
    assert report["lineage"]["run"]["data"]["train"]["sha256"] == "def"
    assert report["lineage"]["audit_verdict"] == "pass"
    table = capsys.readouterr().out
    assert "export-int8" in table and "eval loss" in table and "reload vs in-memory" in table


def test_gpt2_export_keeps_tied_embeddings_and_conv1d_orientation(tmp_path):
    source = _trained("tiny-gpt2", tmp_path / "gpt2", steps=4)
    result = export(source, "nf4", tmp_path / "out")
    _assert_faithful_export(result.out_dir, source, "nf4", True)
    reloaded = AutoModelForCausalLM.from_pretrained(result.out_dir)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()


def test_lora_adapter_is_merged_into_its_base_before_quantizing(llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(llama)
    # Non-zero B, so the merge changes the weights (peft's default init makes LoRA a no-op).
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    merged = tmp_path / "merged"
    lora.merge_and_unload().save_pretrained(merged)
    inference.load(llama).tokenizer.save_pretrained(merged)

    result = export(tmp_path / "adapter", "nf4", tmp_path / "out")

    assert result.report["lineage"]["kind"] == "adapter"
    _assert_faithful_export(result.out_dir, merged, "nf4", True)


def test_export_that_does_not_reload_identically_fails_and_leaves_nothing(llama, tmp_path, monkeypatch):
    real = probe.reload_logits
    monkeypatch.setattr(probe, "reload_logits", lambda *a, **k: real(*a, **k) * (1 + 1e-3))
    with pytest.raises(UserError, match="does not reload as the model that was saved"):
        export(llama, "nf4", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("double_quant", [False, True])
def test_cpu_packed_layers_are_refused_and_their_damage_is_detected(llama, tmp_path, double_quant):
    # What Linear4bit.forward does on a CPU with AVX512-BF16 (this test machine may lack it).
    source = inference.load(llama).model
    config = quantize.bnb_config("nf4", double_quant=double_quant, keep_fp=("lm_head",), compute_dtype="float32")
    model = inference.load(llama, quantization_config=config).model
    assert quantize.weight_errors(model, source).max_step_ratio <= MAX_STEP_RATIO
    for layer in quantize.quantized_modules(model).values():
        layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)

    with pytest.raises(RuntimeError, match="repacked by a CPU forward pass"):
        quantize.save_quantized(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    model.state_dict()  # what save_pretrained runs: bitsandbytes' lossy in-place unpacking
    assert quantize.weight_errors(model, source).max_step_ratio > 1.4 * MAX_STEP_RATIO


def test_unknown_quant_type_and_int8_double_quant_are_user_errors(llama, tmp_path):
    with pytest.raises(UserError, match="unknown quant type 'int4'"):
        export(llama, "int4", tmp_path / "out")
    with pytest.raises(UserError, match="double quantization applies to nf4 and fp4 only"):
        export(llama, "int8", tmp_path / "out", double_quant=True)
    assert list(tmp_path.iterdir()) == []


def test_run_without_final_model_or_checkpoint_is_refused(tmp_path):
    (tmp_path / "run.json").write_text("{}")
    with pytest.raises(UserError, match="the run has no complete checkpoint"):
        export(tmp_path, "nf4", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_dstk(*args, cwd=cwd, timeout=120)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bert")
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    return folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["export", "missing", "--quant", "nf4"], "missing: no such directory"),
        (["export", "{bert}", "--quant", "nf4"], "BertForMaskedLM is not a causal language model"),
        (["export", "{llama}", "--quant", "int4"], "invalid choice: 'int4'"),
        (["export", "{llama}", "--quant", "nf4", "-o", "taken"], "taken already exists"),
        (["export", "{llama}", "--quant", "nf4", "--max-loss-rise", "0.03"], "needs a positive fraction and --eval-data"),
    ],
)
def test_bad_export_input_exits_2_with_one_line_and_writes_nothing(llama, bert_dir, tmp_path, args, message):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    args = [a.format(bert=bert_dir, llama=llama) for a in args]

    done = _cli(*args, cwd=tmp_path)

    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and message in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def _instruction_rows(count: int) -> str:
    return "".join(json.dumps({"prompt": f"the quick {n} ", "response": "brown fox jumps over"}) + "\n"
                   for n in range(count))


def test_int8_export_with_eval_data_caps_the_set_says_each_warning_once_and_makes_out(llama, tmp_path):
    """bitsandbytes warns at every int8 matmul (113,372 lines for 64 records); -o into folders
    that do not exist yet; --eval-limit scores the first N records, loss only unless asked."""
    (tmp_path / "eval.jsonl").write_text(_instruction_rows(40))
    out = tmp_path / "exports" / "tiny" / "int8"
    done = _cli("export", llama, "--quant", "int8", "--eval-data", "eval.jsonl", "--eval-limit", "16", "-o", out,
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert sum("MatMul8bitLt" in line for line in lines) <= 1 and len(lines) < 40
    report = json.loads((out / "export.json").read_text())
    assert report["eval_data"]["records"] == 16
    assert report["quality"]["before"]["examples"] == 16 and report["quality"]["before"]["answer_match"] is None


def test_an_interrupted_export_leaves_nothing(llama, tmp_path):
    """Ctrl-C while scoring: one line, exit 130, and neither OUT nor the folders made for it."""
    import signal
    import time

    (tmp_path / "eval.jsonl").write_text(_instruction_rows(400))
    proc = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "export", str(llama), "--quant", "nf4",
                             "--eval-data", "eval.jsonl", "--answer-match", "-o", str(tmp_path / "new" / "nf4")],
                            cwd=tmp_path, env=user_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "new").exists() and time.monotonic() < deadline:  # scoring has begun
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "dstk export: interrupted" and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.jsonl"]

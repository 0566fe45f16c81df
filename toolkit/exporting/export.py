"""Export a model or run as a bitsandbytes-quantized Hugging Face model, verified and reported.

The export is written to a hidden directory beside OUT and renamed into place only after it has
passed two checks, so OUT either is a verified export or does not exist:

1. every quantized weight and block scale lies within the round-to-nearest bound of its
   full-precision source (:func:`toolkit.exporting.quantize.weight_errors`), which catches a save that
   corrupts block scales (the reload check alone cannot: the damage reloads faithfully);
2. OUT, reloaded by a fresh Python process, gives the same probe logits as the in-memory quantized
   model, to ``RELOAD_TOLERANCE`` relative.

``OUT/export.json`` records sizes, eval quality before and after, both checks, timings, the
sha256 of every file and the lineage of the source.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from data_checks.files import sha256_file
from toolkit import inference
from toolkit.data.records import load_records
from toolkit.errors import UserError
from toolkit.exporting import COMPUTE_DTYPES, QUANT_TYPES, probe, quantize
from toolkit.exporting.sensitivity import layers_to_keep
from toolkit.exporting.source import ModelSource, lineage, resolve

RELOAD_TOLERANCE = 1e-5  # relative probe-logit difference allowed between reload and in-memory model
# Largest weight error allowed, in units of the round-to-nearest bound (toolkit.exporting.quantize): faithful
# exports measure up to 1.0 (the quantizers' thresholds are float constants, hence the 0.1%);
# scales damaged like bitsandbytes' CPU-packing save does measure 1.47 (double quant) to 1e6.
MAX_STEP_RATIO = 1.001
REPORT_FILE = "export.json"
_WEIGHT_FILES = ("*.safetensors", "*.bin")


@dataclass
class ExportResult:
    """A finished export: its directory and the content of its ``export.json``."""

    out_dir: Path
    report: dict

    def summary(self) -> str:
        """A short console table of sizes, quality and verification."""
        r, quant = self.report, self.report["quantization"]["quant"]
        size, quality, check = r["size"], r["quality"], r["verification"]
        lines = [
            f"export {self.out_dir}",
            f"  {'':22}{'source':>12}{quant:>12}{'ratio':>9}",
            _row("weights on disk", size["source_disk_bytes"], size["disk_bytes"], _mib),
            _row("model in memory", size["source_memory_bytes"], size["memory_bytes"], _mib),
            _row("quantized layers", size["quantized_weights_fp16_bytes"], size["quantized_weights_bytes"], _mib, "(fp16)"),
        ]
        if quality:
            before, after = quality["before"], quality["after"]
            lines.append(_row("eval loss", before["loss"], after["loss"], "{:.4f}".format))
            lines.append(_row("perplexity", before["perplexity"], after["perplexity"], "{:.3f}".format))
            if before["answer_match"] is not None:
                lines.append(_row("answer match", before["answer_match"], after["answer_match"], "{:.3f}".format))
        weights = check["weights"]
        lines += [
            f"  probe logits: reload vs in-memory {check['reload_vs_memory']:.2e} (limit {check['tolerance']:.0e}),"
            f" quantized vs source {check['quantized_vs_source']:.4f}",
            f"  weights: worst {weights['max_step_ratio']:.3f} of the rounding bound ({weights['worst_module']}),"
            f" mean relative error {weights['mean_relative']:.4f}",
            f"  {len(r['files'])} files hashed, {r['time_s']['total']:.1f} s",
        ]
        return "\n".join(lines)


def export(
    source: str | Path,
    quant: str,
    out: str | Path | None = None,
    *,
    double_quant: bool | None = None,
    keep_fp: Sequence[str] = ("lm_head",),
    compute_dtype: str | None = None,
    eval_data: str | Path | Sequence[dict] | None = None,
    eval_fields=None,
    eval_limit: int | None = None,
    answer_match: bool = False,
    max_loss_rise: float | None = None,
    trust_remote_code: bool = False,
) -> ExportResult:
    """Quantize a model, adapter or run with bitsandbytes, verify the saved copy and report on it.

    Args:
        source: an HF causal-LM directory, a peft LoRA adapter (merged into its base first) or a
            dstk run directory (its ``final/``).
        quant: ``nf4``, ``fp4`` or ``int8``.
        out: the export directory; must not exist. Default: ``RUN/export-QUANT`` for a run,
            ``MODEL-QUANT`` beside a model or adapter.
        double_quant: quantize the 4-bit block scales too (default on for nf4/fp4; not for int8).
        keep_fp: module names left unquantized.
        compute_dtype: dtype 4-bit layers compute in (default: the source's dtype).
        eval_data: a data file or records (see :func:`toolkit.inference.evaluate`) scored before
            and after quantization; without it the report has no quality section.
        eval_fields: format and field names of ``eval_data`` (a ``toolkit.recipe.DataConfig``);
            default: told by its first record.
        eval_limit: score only the first this many records of ``eval_data``.
        answer_match: also generate an answer for each instruction record, before and after, and
            compare it with the reference: one generation per record and side, so slow on a CPU
            for long answers (loss and perplexity take one forward pass per batch).
        max_loss_rise: the largest relative eval-loss rise allowed (e.g. 0.03); the layers that
            quantization hurts most are then left in full precision too, as few as the budget
            allows (see :mod:`toolkit.exporting.sensitivity`). Needs ``eval_data``.
        trust_remote_code: allow model code shipped inside the source directory to run.

    Returns:
        An :class:`ExportResult`.

    Raises:
        UserError: bad input (found before any model is loaded), or an export that failed
            verification (nothing is left at ``out``).
    """
    start = time.perf_counter()
    _check_options(quant, double_quant, compute_dtype)
    if eval_limit is not None and not (eval_limit >= 1 and eval_data is not None):
        raise UserError(f"--eval-limit {eval_limit} needs a positive count and --eval-data to take it from",
                        "give e.g. --eval-limit 64 --eval-data FILE")
    if max_loss_rise is not None and (eval_data is None or not max_loss_rise > 0):
        raise UserError(f"--max-loss-rise {max_loss_rise} needs a positive fraction and --eval-data to measure it on",
                        "give e.g. --max-loss-rise 0.03 --eval-data FILE")
    out = Path(out) if out is not None else None
    if out is not None:
        _check_out(out)  # before resolving, which reads the source's files
    src = resolve(source, trust_remote_code=trust_remote_code)
    if out is None:
        out = _default_out(src, quant)
        _check_out(out)

    evaluation = None
    if eval_data is not None:
        records = list(load_records(str(eval_data)) if isinstance(eval_data, (str, Path)) else eval_data)
        evaluation = (records[:eval_limit], eval_fields or inference.infer_fields(records))
    options = {
        "quant": quant,
        "double_quant": (quant != "int8") if double_quant is None else double_quant,
        "keep_fp": list(keep_fp),
        "compute_dtype": compute_dtype,
        "max_loss_rise": max_loss_rise,
        "answer_match": answer_match,
    }
    made = [p for p in reversed(out.parents) if not p.exists()]  # -o a/b/out makes a/ and a/b/
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = [*made, Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))]
    try:
        model_dir = src.model_dir
        if src.adapter_dir:
            model_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.merged-", dir=out.parent))
            scratch.append(model_dir)
            _merge_adapter(src, model_dir, trust_remote_code)
        staging = scratch[len(made)]
        report = _export_into(staging, model_dir, options, evaluation, trust_remote_code)
        report["eval_data"] = _describe_eval_data(eval_data, evaluation)
        report["lineage"] = lineage(src)
        report["time_s"]["total"] = time.perf_counter() - start
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if out.exists():
            raise UserError(f"{out} appeared while exporting", "choose another -o OUT")
        os.rename(staging, out)
        scratch = [p for p in scratch if p != staging and p not in made]
    finally:  # a failed or interrupted export leaves nothing, not even the folders it made for OUT
        for path in reversed(scratch):
            shutil.rmtree(path, ignore_errors=True)
    return ExportResult(out, report)


def _export_into(staging: Path, model_dir: Path, options: dict, evaluation, trust_remote_code: bool) -> dict:
    """Quantize ``model_dir`` into ``staging``, verify it, and return the report (without lineage).

    ``evaluation`` is None or ``(records, fields)`` to score before and after quantization.
    """
    from transformers import AutoTokenizer

    times, tick = {}, time.perf_counter()
    source = inference.load(model_dir, trust_remote_code=trust_remote_code)
    config = source.model.config
    ids = probe.probe_ids(config.vocab_size, getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None))
    source_logits = probe.probe_logits(source.model, ids)
    before = (inference.evaluate(source, evaluation[0], fields=evaluation[1], answer_match=options["answer_match"])
              if evaluation else None)
    options["compute_dtype"] = options["compute_dtype"] or str(source.model.dtype).removeprefix("torch.")
    times["source"], tick = time.perf_counter() - tick, time.perf_counter()

    def bnb_config():
        return quantize.bnb_config(options["quant"], double_quant=options["double_quant"],
                                   keep_fp=tuple(options["keep_fp"]), compute_dtype=options["compute_dtype"])

    search = None
    if options["max_loss_rise"] is not None:
        search = layers_to_keep(model_dir, bnb_config(), source, evaluation, before.loss, options["max_loss_rise"],
                                trust_remote_code)
        options["keep_fp"] = options["keep_fp"] + search.kept
        times["keep_search"], tick = time.perf_counter() - tick, time.perf_counter()
    quantized = inference.load(model_dir, quantization_config=bnb_config(), trust_remote_code=trust_remote_code)
    # Save before the quantized model runs anything: see toolkit.exporting.quantize on why a forward pass first
    # would make bitsandbytes write wrong block scales.
    quantize.save_quantized(quantized.model, staging)
    if inference.has_tokenizer(model_dir):
        AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code).save_pretrained(staging)
    weights = quantize.weight_errors(quantized.model, source.model)
    if not weights.max_step_ratio <= MAX_STEP_RATIO:
        raise UserError(
            f"quantized weights of {weights.worst_module} are {weights.max_step_ratio:.2f}x further from the source than rounding allows",
            "the quantized model was damaged before or while saving; report it with `dstk env`",
        )
    source_sizes = {
        "source_disk_bytes": _weight_bytes(model_dir),
        "source_memory_bytes": source.model.get_memory_footprint(),
        "whole_model_fp16_bytes": 2 * sum(p.numel() for p in source.model.parameters()),
    }
    del source  # only one full-precision copy at a time
    times["quantize_and_save"], tick = time.perf_counter() - tick, time.perf_counter()

    memory_logits = probe.probe_logits(quantized.model, ids)
    after = (inference.evaluate(quantized, evaluation[0], fields=evaluation[1], answer_match=options["answer_match"])
             if evaluation else None)
    times["eval_quantized"], tick = time.perf_counter() - tick, time.perf_counter()
    reloaded = probe.reload_logits(staging, ids, trust_remote_code=trust_remote_code)
    reload_error = probe.relative_error(reloaded, memory_logits)
    if not reload_error <= RELOAD_TOLERANCE:
        raise UserError(
            f"the saved {options['quant']} model does not reload as the model that was saved "
            f"(probe logits differ by {reload_error:.2e} relative, limit {RELOAD_TOLERANCE:.0e})",
            "no export was written; report it with `dstk env`",
        )
    times["verify_reload"] = time.perf_counter() - tick

    return {
        "format": "dstk-export/1",
        "quantization": options | {"quantized_modules": weights.modules, "versions": quantize.versions(),
                                   "keep_search": None if search is None else search.as_dict()},
        "size": _sizes(source_sizes, staging, quantized.model),
        "quality": _quality(before, after),
        "verification": {
            "probe_shape": list(ids.shape),
            "reload_vs_memory": reload_error,
            "tolerance": RELOAD_TOLERANCE,
            "quantized_vs_source": probe.relative_error(memory_logits, source_logits),
            "weights": asdict(weights),
        },
        "time_s": times,
        "files": {p.relative_to(staging).as_posix(): _file_entry(p) for p in sorted(staging.rglob("*")) if p.is_file()},
    }


def _sizes(source_sizes: dict, staging: Path, quantized) -> dict:
    """Bytes of the source and the export, and their ratios."""
    stored, fp16 = quantize.quantized_weight_bytes(staging, quantized)
    sizes = source_sizes | {
        "disk_bytes": _weight_bytes(staging),
        "memory_bytes": quantized.get_memory_footprint(),
        "quantized_weights_bytes": stored,
        "quantized_weights_fp16_bytes": fp16,
    }
    return sizes | {
        "disk_ratio": sizes["disk_bytes"] / sizes["source_disk_bytes"],
        "memory_ratio": sizes["memory_bytes"] / sizes["source_memory_bytes"],
        "quantized_weights_fp16_ratio": stored / fp16,
        "whole_model_fp16_ratio": sizes["disk_bytes"] / sizes["whole_model_fp16_bytes"],
    }


def _merge_adapter(src: ModelSource, into: Path, trust_remote_code: bool) -> None:
    """Merge a LoRA adapter into its full-precision base and save the result (with a tokenizer) in ``into``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(src.model_dir, dtype="auto", trust_remote_code=trust_remote_code,
                                                use_safetensors=True)
    PeftModel.from_pretrained(base, src.adapter_dir).merge_and_unload().save_pretrained(into)
    tokenizer_dir = src.adapter_dir if inference.has_tokenizer(src.adapter_dir) else src.model_dir
    if inference.has_tokenizer(tokenizer_dir):
        AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=trust_remote_code).save_pretrained(into)


def _check_options(quant: str, double_quant: bool | None, compute_dtype: str | None) -> None:
    if quant not in QUANT_TYPES:
        raise UserError(f"unknown quant type {quant!r}", f"choose one of {', '.join(QUANT_TYPES)}")
    if quant == "int8" and double_quant:
        raise UserError("double quantization applies to nf4 and fp4 only", "drop --double-quant for int8")
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise UserError(f"unknown compute dtype {compute_dtype!r}", f"choose one of {', '.join(COMPUTE_DTYPES)}")


def _check_out(out: Path) -> None:
    if out.exists():
        raise UserError(f"{out} already exists", "choose another -o OUT, or remove it")
    taken = next((p for p in out.parents if p.exists()), None)
    if taken is not None and not taken.is_dir():
        raise UserError(f"{taken} is a file, so {out} cannot be made", "choose another -o OUT")


def _default_out(src: ModelSource, quant: str) -> Path:
    if src.run_dir:
        return src.run_dir / f"export-{quant}"
    return src.path.parent / f"{src.path.resolve().name}-{quant}"


def _quality(before, after) -> dict | None:
    """Eval results (:class:`toolkit.inference.EvalResult`) before and after quantization, and the loss change."""
    if before is None:
        return None
    return {
        "before": before.as_dict(),
        "after": after.as_dict(),
        "loss_change": (after.loss - before.loss) / before.loss,  # relative: +0.02 is a 2% rise
    }


def _describe_eval_data(eval_data, evaluation) -> dict | None:
    if eval_data is None:
        return None
    scored = {"records": len(evaluation[0])}
    if isinstance(eval_data, (str, Path)):
        path = Path(eval_data)  # a file, a folder or a hub id
        return {"path": str(eval_data), "sha256": sha256_file(path) if path.is_file() else None, **scored}
    return scored


def _weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for pattern in _WEIGHT_FILES for p in model_dir.glob(pattern))


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _row(label: str, source, exported, fmt, note: str = "") -> str:
    ratio = f"{exported / source:.3f}x" if source else "-"
    return f"  {label:22}{fmt(source):>12}{fmt(exported):>12}{ratio:>9} {note}".rstrip()

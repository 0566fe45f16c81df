"""The summary of benchmarks/gpu_check.sh: OUT/summary.md and OUT/summary.json from what the checks left in OUT.

    python benchmarks/gpu_summary.py OUT

Reads OUT/tests.xml (pytest's JUnit report of tests/gpu), OUT/figures.jsonl (the figures the
checks recorded) and OUT/throughput.json (benchmarks/trainer_throughput.py --json). A missing file
shows as such: a check that was cut short still leaves the others' results. Exits 1 unless every
check passed and the throughput ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from datetime import date
from pathlib import Path


def machine() -> dict:
    import bitsandbytes
    import deepspeed
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {"date": date.today().isoformat(), "gpu": gpu, "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "deepspeed": deepspeed.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def test_results(xml: Path) -> list[dict]:
    """Each test's outcome (pass / FAIL: first line / skipped: reason) and seconds, in file order."""
    if not xml.is_file():
        return [{"test": "tests/gpu", "outcome": "FAIL: no report (the run was cut short: see tests.log)", "seconds": 0}]
    results = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome = "pass"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                message = " ".join((found.get("message") or tag).split())[:200]
                outcome = f"skipped: {message}" if tag == "skipped" else f"FAIL: {message}"
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        results.append({"test": name, "outcome": outcome, "seconds": float(case.get("time", 0))})
    return results


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def figure_text(figures: dict) -> str:
    def show(value):
        if isinstance(value, float):
            return f"{value:.3g}"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
        if isinstance(value, list) and len(value) > 4:
            return f"{show(value[0])} .. {show(value[-1])} ({len(value)})"
        return str(value)

    return ", ".join(f"{key} {show(value)}" for key, value in figures.items() if key != "check")


def markdown(info: dict, tests: list[dict], figures: list[dict], throughput: dict | None) -> str:
    lines = [f"GPU check of {info['date']} on {info['gpus']} x {info['gpu']}: torch {info['torch']} (CUDA "
             f"{info['cuda']}), DeepSpeed {info['deepspeed']}, transformers {info['transformers']}, "
             f"bitsandbytes {info['bitsandbytes']}.", "", "| check | result | s |", "|---|---|---|"]
    lines += [f"| {t['test']} | {t['outcome'].replace('|', '/')} | {t['seconds']:.0f} |" for t in tests]
    if figures:
        lines += ["", "| figures of | values |", "|---|---|"]
        lines += [f"| {f['check']} | {figure_text(f).replace('|', '/')} |" for f in figures]
    lines.append("")
    if throughput is None:
        lines.append("Throughput: not measured (see throughput.log).")
        return "\n".join(lines) + "\n"
    t = throughput
    lines += [f"Throughput, dstk vs the HF Trainer: LLaMA {t['parameters'] / 1e6:.0f}M, ZeRO-2 {t['precision']}, "
              f"{t['ranks']} {t['rank_unit']}(s), {t['steps']} steps ({t['warmup_steps']} untimed) of "
              f"{t['micro_batch_size'] * t['ranks']} records up to {t['seq_len']} tokens; MFU against the "
              f"{t['precision']} matmul peak measured in the same run, {t['peak_flops'] / 1e12:.0f} TFLOP/s.", "",
              "| data | side | real tokens/s | MFU | eval loss |", "|---|---|---|---|---|"]
    lines += [f"| {r['data']} | {r['side']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {r['eval_loss']:.4f} |"
              for r in t["rows"]]
    rates = {(r["data"], r["side"]): r["tokens_per_s"] for r in t["rows"]}
    for data in dict.fromkeys(r["data"] for r in t["rows"]):
        if (data, "dstk") in rates and (data, "Trainer") in rates:
            lines.append(f"\n{data}: dstk / Trainer {rates[data, 'dstk'] / rates[data, 'Trainer']:.2f}x real tokens/s")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    out = args.out
    info = machine()
    tests = test_results(out / "tests.xml")
    figures = read_jsonl(out / "figures.jsonl")
    throughput = json.loads((out / "throughput.json").read_text()) if (out / "throughput.json").is_file() else None
    (out / "summary.json").write_text(json.dumps({"machine": info, "tests": tests, "figures": figures,
                                                  "throughput": throughput}, indent=1) + "\n")
    text = markdown(info, tests, figures, throughput)
    (out / "summary.md").write_text(text)
    print(text)
    passed = all(t["outcome"] == "pass" for t in tests) and throughput is not None
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

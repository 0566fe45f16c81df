"""What validation accepts runs to the end: the layout x feature matrix.

Every pair of values of the recipe keys that shape a run (ZeRO stage, offload, pipeline stages,
tensor parallelism, precision, adapters, packing, compilation, gradient accumulation) is covered by
at least one combination, chosen greedily among the combinations validation accepts; a pair no
accepted combination holds is shown refused, with validation's reason. Each chosen combination then
lives a whole run on 2 CPU ranks (benchmarks/matrix_worker.py, one launch each, started as the
suite's multi-rank tests start theirs: tests.multirank, so the test extra is needed), each stage
pass or FAIL with its first error line:

    train      6 steps of the built-in default, a checkpoint at 3 and at 6
    final      final/ reloads (a LoRA adapter onto its base, quantized as trained) to the engine's logits
    resume     rolled back to step 3 and resumed with resume=auto: steps 4-6 repeat the losses
    export     `dstk export RUN --quant nf4` verifies and writes the export

    python benchmarks/layout_matrix.py                 # the whole matrix (~15 min on 2 cores)
    python benchmarks/layout_matrix.py --slice ci      # what CI runs (tests/toolkit/test_layout_matrix.py)
    python benchmarks/layout_matrix.py --list          # the combinations and refused pairs, nothing run
    python benchmarks/layout_matrix.py --keep          # keep the runs (and each one's log.txt)

The combinations the README's commands name run too (README_NAMED).
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scratch import add_keep_flag, scratch  # noqa: E402  (the checkout first on the path)

FACTORS = {
    "parallel.zero_stage": [0, 1, 2, 3],
    "parallel.offload": ["none", "cpu"],
    "parallel.pipeline_stages": [1, 2],
    "parallel.tensor_parallel": [1, 2],
    "train.precision": ["fp32", "bf16"],
    "adapters": ["none", "lora", "qlora-nf4", "qlora-int8"],
    "train.packing": [False, True],
    "train.compile": [False, True],
    "train.grad_accum": [1, 2],
}
ADAPTERS = {"none": [], "lora": ["lora.enabled=true", "lora.dropout=0"],
            "qlora-nf4": ["lora.enabled=true", "lora.dropout=0", "lora.quantize_base=nf4"],
            "qlora-int8": ["lora.enabled=true", "lora.dropout=0", "lora.quantize_base=int8"]}
# what CI runs: the combinations most likely to break where the others do not
CI_SLICE = [
    # QLoRA under ZeRO-3 crashed saving after its last step, once an eval had run (#21)
    {"parallel.zero_stage": 3, "adapters": "qlora-nf4", "train.packing": True},
    # a bf16 pipeline at ZeRO 0 could not resume (toolkit.plan.ds_config)
    {"parallel.pipeline_stages": 2, "train.precision": "bf16", "train.grad_accum": 2},
    # AutoTP's first-batch check crashed on packed batches when resuming (toolkit.training.trainer)
    {"parallel.zero_stage": 1, "parallel.tensor_parallel": 2, "train.precision": "bf16", "train.packing": True},
]
# the combinations the README's commands name, run whole besides the pairs
README_NAMED = [
    {"parallel.zero_stage": 1},  # the default run
    {"parallel.zero_stage": 3},
    {"parallel.zero_stage": 1, "parallel.pipeline_stages": 2},
    {"parallel.zero_stage": 1, "adapters": "lora"},
    {"parallel.zero_stage": 3, "adapters": "qlora-nf4"},
]
STAGES = ("train", "final", "resume", "export")


def overrides(combo: dict) -> list[str]:
    """The recipe overrides of a combination."""
    out = []
    for key, value in combo.items():
        if key == "adapters":
            out += ADAPTERS[value]
        else:
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def full(partial: dict) -> dict:
    """A combination with every factor, unnamed ones at their first value (the recipe's default)."""
    return {key: partial.get(key, values[0]) for key, values in FACTORS.items()}


@lru_cache(maxsize=None)
def _refusal(items: tuple) -> str | None:
    from toolkit.errors import UserError
    from toolkit.plan.prepare import validate
    from toolkit.recipe import load_recipe

    try:
        validate(load_recipe("tiny", ["parallel.nproc=2", *overrides(dict(items))]))
    except UserError as err:  # the reasons alone: "invalid recipe tiny: ... (fix the recipe or ...)"
        return re.sub(r"^invalid recipe \S+: | \(fix the recipe or the key=value override\)$", "", str(err))
    return None


def refusal(combo: dict) -> str | None:
    """Why validation refuses ``combo``, or None when it accepts it."""
    return _refusal(tuple(sorted(full(combo).items())))


def plan() -> tuple[list[dict], dict]:
    """(accepted combinations covering every pair some accepted combination holds, and the README's;
    refused pairs -> validation's reason)."""
    keys = list(FACTORS)
    every_combo = [dict(zip(keys, values)) for values in itertools.product(*FACTORS.values())]
    accepted = [combo for combo in every_combo if refusal(combo) is None]

    def pairs(combo):
        return {((a, combo[a]), (b, combo[b])) for a, b in itertools.combinations(keys, 2)}

    reachable = set().union(*map(pairs, accepted))
    chosen, uncovered = [], set(reachable)
    while uncovered:  # greedy set cover: the combination that covers the most pairs still uncovered
        best = max(accepted, key=lambda combo: len(pairs(combo) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    chosen += [combo for combo in map(full, README_NAMED) if combo not in chosen]
    every = {((a, va), (b, vb)) for a, b in itertools.combinations(keys, 2) for va in FACTORS[a] for vb in FACTORS[b]}
    # the reason for a pair: the shortest refusal among the combinations holding it, the one that
    # names this pair's conflict and no other
    refused = {pair: min((refusal(combo) for combo in every_combo if all(combo[k] == v for k, v in pair)), key=len)
               for pair in every - reachable}
    return chosen, refused


def short(combo: dict) -> str:
    """A combination by what differs from the defaults."""
    parts = [f"{key.split('.')[-1]}={value}" for key, value in combo.items() if value != FACTORS[key][0]]
    return " ".join(parts) or "defaults"


def run_combo(combo: dict, out: Path, timeout: int, extra: tuple[str, ...] = (), nproc: int = 2) -> dict:
    """One combination's whole life on ``nproc`` ranks; the worker's verdict per stage.

    ``extra`` overrides come last (another model, ``parallel.nproc``: the GPU checks' one rank).
    """
    from tests.multirank import run_deepspeed

    out.mkdir(parents=True, exist_ok=True)
    try:
        return run_deepspeed(ROOT / "benchmarks" / "matrix_worker.py", out.resolve(), *overrides(combo), *extra,
                             nproc=nproc, timeout=timeout)[0]
    except RuntimeError as err:  # a FAIL (every rank exits 1), a crash or a timeout: the output says
        log = str(err)
    (out / "log.txt").write_text(log)
    result_file = out / "stages.json"  # rank 0's verdicts, written after each stage
    stages = json.loads(result_file.read_text()) if result_file.is_file() else {}
    pending = next((stage for stage in STAGES if stage not in stages), None)
    if pending is not None and not any(verdict.startswith("FAIL") for verdict in stages.values()):
        errors = [line.strip() for line in log.splitlines() if "Error" in line]
        ending = log.splitlines()[0] if log else "no output"
        stages[pending] = f"FAIL: {ending[:80]}: " + (errors[-1][:200] if errors else "no error line")
    return stages


def table(rows: list[tuple[dict, dict]], refused: dict) -> str:
    out = [f"| combination | {' | '.join(STAGES)} |", "|---|" + "---|" * len(STAGES)]
    for combo, stages in rows:
        cells = [stages.get(stage, "skipped") for stage in STAGES]
        out.append(f"| {short(combo)} | " + " | ".join(c if c == "pass" else c.replace("|", "/") for c in cells) + " |")
    if refused:
        out += ["", "| refused at validation | reason |", "|---|---|"]
        reasons = {}
        for (a, b), reason in sorted(refused.items(), key=str):
            reasons.setdefault(reason, []).append(f"{a[0].split('.')[-1]}={a[1]} + {b[0].split('.')[-1]}={b[1]}")
        for reason, pairs in reasons.items():
            out.append(f"| {'; '.join(pairs)} | {reason} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slice", choices=("all", "ci"), default="all")
    parser.add_argument("--list", action="store_true", help="print the combinations and refused pairs only")
    add_keep_flag(parser, "a few GB")
    parser.add_argument("--timeout", type=int, default=900, help="seconds a combination may take")
    args = parser.parse_args(argv)
    chosen, refused = plan()
    if args.slice == "ci":
        chosen = [full(combo) for combo in CI_SLICE]
    print(f"{len(chosen)} combinations cover every pair of values that validation accepts together and the "
          f"README's; {len(refused)} pairs are refused", flush=True)
    if args.list:
        print(table([(combo, {}) for combo in chosen], refused))
        return 0
    rows = []
    with scratch("dstk-matrix-", args.keep) as root:
        for i, combo in enumerate(chosen):
            stages = run_combo(combo, root / f"combo{i:02d}", args.timeout)
            rows.append((combo, stages))
            print(f"{short(combo):<60} " + " ".join(f"{s}={stages.get(s, 'skipped')[:60]}" for s in STAGES), flush=True)
    print()
    print(table(rows, refused))
    failed = sum(1 for _, stages in rows for stage in STAGES if stages.get(stage, "skipped") != "pass")
    print(f"\n{len(rows)} combinations run, {len(refused)} pairs refused at validation, {failed} stage(s) FAIL")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

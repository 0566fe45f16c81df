"""Worker of benchmarks/layout_matrix.py: one combination's whole life on the ranks the launcher started.

Usage: deepspeed --num_gpus 2 benchmarks/matrix_worker.py OUT [key=value ...]
Writes OUT/stages.json on rank 0 after each stage: "pass" or "FAIL: the first line of what went
wrong"; at the first FAIL every rank exits 1 (tracebacks on stderr), and after the last stage
every rank hands the verdicts back through tests.multirank.write_result.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from benchmarks.layout_matrix import STAGES
from tests.multirank import write_result
from toolkit import finetune
from toolkit.checkpoints.store import list_checkpoints, tag
from toolkit.models.loading import placement
from toolkit.models.lora import reload
from toolkit.recipe import load_recipe

STEPS, SAVE_AT = 6, 3
COMMON = [f"train.max_steps={STEPS}", f"train.save_steps={SAVE_AT}", "train.log_steps=1", "train.lr=1e-2",
          "train.warmup_ratio=0.2", "data.train_limit=512", "data.eval_limit=16", "audit.enforce=false",
          "parallel.nproc=2"]


def first_line(err: BaseException) -> str:
    traceback.print_exc()  # the whole story into the combination's log.txt
    text = " ".join(str(err).split()) or type(err).__name__
    return f"FAIL: {type(err).__name__}: {text}"[:240]


def probe(recipe) -> torch.Tensor:
    """Token ids inside the tiny vocabulary, one micro-batch of seq_len: the one shape a pipeline
    engine takes."""
    rows, cols = recipe.train.micro_batch_size, recipe.train.seq_len
    return torch.arange(rows * cols).view(rows, cols) * 7 % 90 + 5


def engine_logits(engine, ids: torch.Tensor) -> torch.Tensor | None:
    """The trained engine's logits on the probe, on rank 0 (every rank calls this)."""
    engine.eval()
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        if hasattr(engine, "eval_batch"):  # a pipeline: the last stage has them
            batch = ((ids, torch.ones_like(ids)), (ids.clone(), torch.tensor(1.0)))
            _, logits = engine.eval_batch(iter([batch]), return_logits=True, num_micro_batches=1)
            found = [logits.float().cpu() if engine.is_last_stage() else None]
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, found[0])
            return next(item for item in gathered if item is not None)
        return engine.module(input_ids=ids.to(engine.device)).logits.float().cpu()


def final_logits(folder: Path, recipe, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    unset_hf_deepspeed_config()  # the trained ZeRO-3 engine's: from_pretrained loads plainly, where it is told
    dtype = torch.bfloat16 if recipe.train.precision == "bf16" else torch.float32
    if recipe.lora.enabled:
        model = reload(folder, recipe.lora, dtype)
    else:  # on the engine's device: a CPU's bf16 kernels round otherwise than a GPU's
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placement())
    with torch.no_grad():
        return model.eval()(input_ids=ids.to(model.device)).logits.float().cpu()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


class Life:
    """One combination's run and what its stages hand on."""

    def __init__(self, out: Path, overrides: list[str]):
        self.out, self.overrides, self.run = out, overrides, out / "run"
        self.rank = dist.get_rank()
        # bf16 logits differ by a few units in the last place between two kernels' summation orders
        self.tolerance = 3e-2 if "train.precision=bf16" in overrides else 1e-5
        self.result = None

    def train(self) -> str:
        self.result = finetune("tiny", [f"output_dir={self.run}", *COMMON, *self.overrides])
        complete = [e["step"] for e in list_checkpoints(self.run / "checkpoints") if e["state"] == "complete"]
        losses = self.result.losses
        if complete != [SAVE_AT, STEPS] or len(losses) != STEPS or not all(abs(x) < 1e4 for x in losses):
            return f"FAIL: checkpoints {complete}, losses {losses}"
        return "pass"

    def final(self) -> str:
        recipe = load_recipe(self.run / "recipe.yaml")
        trained = engine_logits(self.result.engine, probe(recipe))
        self.result = None
        gc.collect()
        verdict = "pass"
        if self.rank == 0:
            diff = relative(final_logits(self.run / "final", recipe, probe(recipe)), trained)
            verdict = "pass" if diff < self.tolerance else f"FAIL: final/ logits {diff:.1e} from the engine's"
        dist.barrier()
        return verdict

    def resume(self) -> str:
        """Rolled back to the middle checkpoint, resumed: the same losses again."""
        again = self.out / "resumed"
        if self.rank == 0:
            shutil.copytree(self.run, again, ignore=shutil.ignore_patterns("final", "report.*"))
            shutil.rmtree(again / "checkpoints" / tag(STEPS))
            (again / "checkpoints" / "latest").write_text(tag(SAVE_AT))
        dist.barrier()
        resumed = finetune("tiny", [f"output_dir={again}", *COMMON, *self.overrides, "resume=auto"])
        logged = [json.loads(line) for line in (self.run / "metrics.jsonl").read_text().splitlines()]
        expected = [entry["loss"] for entry in logged if "loss" in entry][SAVE_AT:]
        diff = max(abs(a - b) / abs(b) for a, b in zip(resumed.losses, expected))
        if len(resumed.losses) != STEPS - SAVE_AT or diff >= self.tolerance:
            return f"FAIL: resumed losses {resumed.losses} vs {expected}"
        return "pass"

    def export(self) -> str:
        if self.rank != 0:
            return "pass"
        done = subprocess.run([sys.executable, "-m", "toolkit.cli", "export", str(self.run), "--quant", "nf4",
                               "-o", str(self.out / "nf4")], capture_output=True, text=True, timeout=600)
        if done.returncode:
            return "FAIL: " + (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1][:220]
        return "pass"


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher puts it first
    out = Path(args[0])
    deepspeed.init_distributed(verbose=False)
    life = Life(out, args[1:])
    stages: dict[str, str] = {}
    for name in STAGES:
        try:
            stages[name] = getattr(life, name)()
        except Exception as err:  # every stage's failure goes into the table
            stages[name] = first_line(err)
        if life.rank == 0:  # after each stage: a hang later keeps what passed
            (out / "stages.json").write_text(json.dumps(stages, indent=1))
        if stages[name] != "pass":
            # the ranks are out of step now: exit, and the launcher stops the others
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
    write_result(stages)
    return 0


if __name__ == "__main__":
    sys.exit(main())

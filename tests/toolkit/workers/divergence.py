"""Worker: the divergence guard on a real run, with a weight turned to NaN before step 7.

Usage: divergence.py OUT. Runs, in one launch, an uninterrupted reference (OUT/reference, also the
reference of the crash tests), then the same run with the fault under
``train.divergence.action=stop`` and under ``skip``; each rank writes what it saw.
The fault is a real one (a weight set to NaN, as a bad kernel or a flipped bit leaves it); the
guard, the checkpoints and the rollback under test are the product's own.
"""

import argparse

import torch

from tests.multirank import write_result
from toolkit import finetune
from toolkit.training.divergence import Diverged
from toolkit.training.trainer import Trainer

FAULT_STEP = 7
parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--local_rank", type=int)  # passed by the launcher
args = parser.parse_args()
COMMON = ["train.max_steps=16", "train.save_steps=4", "train.log_steps=1", "data.eval=null",
          "audit.enforce=false", "data.train_limit=2000"]  # as test_fault_injection's RECIPE


def inject_fault() -> None:
    """Before step FAULT_STEP, once, set the first weight to NaN."""
    original, fired = Trainer.train_step, []

    def train_step(self, step):
        if step + 1 == FAULT_STEP and not fired:
            fired.append(step)
            with torch.no_grad():
                next(self.engine.module.parameters()).fill_(float("nan"))
        return original(self, step)

    Trainer.train_step = train_step


def weights_finite(result) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in result.engine.module.parameters())


reference = finetune(None, [*COMMON, f"output_dir={args.out}/reference"])
inject_fault()
try:
    finetune(None, [*COMMON, f"output_dir={args.out}/stop", "train.divergence.action=stop"])
    stopped = None
except Diverged as err:
    stopped = str(err)
inject_fault()
skipped = finetune(None, [*COMMON, f"output_dir={args.out}/skip", "train.divergence.action=skip"])
write_result({"reference": reference.losses, "stopped": stopped, "skip": skipped.losses,
              "skip_weights_finite": weights_finite(skipped)})

"""Worker (one rank, no launcher): the same run three times in OUT, the last two failing after their
last step, and each outcome written to OUT/outcomes.json.

- ``whole``: as it comes;
- ``no_final``: writing final/ fails (the checkpoint of the last step is saved);
- ``no_checkpoint``: saving the last step's checkpoint fails (final/ must come from memory).
"""

import json
import sys
from pathlib import Path

from toolkit.checkpoints import store
from toolkit.errors import ResultNotWritten
from toolkit.training import finetune as finetune_module

out = Path(sys.argv[1])
COMMON = ["train.max_steps=6", "train.save_steps=3", "train.log_steps=1", "data.train_limit=200",
          "data.eval_limit=8", "audit.enforce=false", "train.seed=7"]
outcomes = {}


def run(name: str) -> None:
    try:
        finetune_module.finetune("tiny", [f"output_dir={out / name}", *COMMON])
        outcomes[name] = {"error": None}
    except ResultNotWritten as err:
        outcomes[name] = {"error": str(err), "exit_code": err.exit_code}


def failing(message: str):
    def fail(*args, **kwargs):
        raise OSError(message)
    return fail


run("whole")
real_consolidate, real_save = finetune_module.consolidate, store.save
finetune_module.consolidate = failing("No space left on device")
run("no_final")
finetune_module.consolidate = real_consolidate
store.save = lambda engine, folder, step, *a, **k: (failing("Input/output error")() if step == 6
                                                   else real_save(engine, folder, step, *a, **k))
run("no_checkpoint")
(out / "outcomes.json").write_text(json.dumps(outcomes))

"""dstk: fine-tune Hugging Face causal LMs under DeepSpeed, behind a data audit gate.

Public API::

    import toolkit
    result = toolkit.finetune("tiny", ["train.max_steps=50"])   # one rank; under `deepspeed` every rank
    code = toolkit.launch(toolkit.load_recipe("tiny"))          # gate + launch workers, like `dstk train`
"""

from toolkit.errors import AuditFailed, UserError
from toolkit.finetuning import FinetuneResult, finetune
from toolkit.launcher import launch
from toolkit.recipe import Recipe, load_recipe

__all__ = ["AuditFailed", "FinetuneResult", "Recipe", "UserError", "finetune", "launch", "load_recipe"]

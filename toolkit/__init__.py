"""dstk: fine-tune Hugging Face causal LMs under DeepSpeed, behind a data audit gate.

Public API::

    import toolkit
    result = toolkit.finetune("tiny", ["train.max_steps=50"])   # one rank; under `deepspeed` every rank
    code = toolkit.launch(toolkit.load_recipe("tiny"))          # plan + launch workers, like `dstk train`
    exported = toolkit.export("runs/tiny", "nf4")               # a verified quantized export

The names below are imported on first use (PEP 562), so that ``import toolkit`` and the ``dstk``
command line stay cheap, and ``dstk audit`` on files runs where torch is not installed.
"""

from importlib import import_module

from toolkit import quiet

quiet.install()

__all__ = ["AuditFailed", "FinetuneResult", "Recipe", "UserError", "export", "finetune", "launch", "load_recipe"]
_HOMES = {"AuditFailed": "toolkit.errors", "UserError": "toolkit.errors", "Recipe": "toolkit.recipe",
          "load_recipe": "toolkit.recipe", "FinetuneResult": "toolkit.training.finetune",
          "finetune": "toolkit.training.finetune", "launch": "toolkit.launching.launcher",
          "export": "toolkit.exporting.export"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)

"""What a run computes with on this machine, recorded in run.json as ``runtime``.

dstk picks some measures by accelerator: on a CPU it keeps freed host memory in the process,
routes small collectives through shared memory, keeps ZeRO's buffers and trains compiled models
with eager attention; on a GPU it leaves all of them off. The record says which path ran, so a
slow or odd run can be told apart from a misconfigured one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def accelerator() -> str:
    """``cuda <device name>`` for this rank's GPU, else ``cpu``."""
    if torch.cuda.is_available():
        return f"cuda {torch.cuda.get_device_name(torch.cuda.current_device())}"
    return "cpu"


def optimizer_name(engine) -> str:
    """The optimizer class DeepSpeed built under its ZeRO wrapper, with ``(fused)`` for torch's one-kernel form."""
    inner = getattr(engine, "basic_optimizer", None) or engine.optimizer
    fused = bool(getattr(inner, "defaults", {}).get("fused"))
    return f"{type(inner).__module__}.{type(inner).__qualname__}" + (" (fused)" if fused else "")


def attention(module: torch.nn.Module) -> str | None:
    """The attention implementation the model's layers run (a pipeline's layers keep their HF config)."""
    for sub in module.modules():
        chosen = getattr(getattr(sub, "config", None), "_attn_implementation", None)
        if chosen:
            return chosen
    return None


def runtime(engine) -> dict[str, str | None]:
    return {"accelerator": accelerator(), "comm_backend": dist.get_backend(), "optimizer": optimizer_name(engine),
            "attention": attention(engine.module)}

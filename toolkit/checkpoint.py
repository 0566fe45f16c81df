"""DeepSpeed checkpoints of a run, resume, and consolidation to a Hugging Face model.

Checkpoints are DeepSpeed's own (``checkpoints/step_NNNNNN`` and ``latest``), so DeepSpeed's
tools work on them. ``final/`` is a standard HF directory (safetensors, config, tokenizer) built
from the engine's in-memory weights: under ZeRO-3 each module's shards are gathered in turn and
only rank 0 keeps the full state dict.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

log = logging.getLogger(__name__)


def tag(step: int) -> str:
    return f"step_{step:06d}"


def save(engine, folder: Path, step: int) -> Path:
    """Save a DeepSpeed checkpoint of ``step`` (a collective call on every rank)."""
    engine.save_checkpoint(str(folder), tag=tag(step), client_state={"step": step})
    return folder / tag(step)


def resume(engine, folder: Path) -> int:
    """Load the newest checkpoint in ``folder`` into ``engine``; return its step (0 if none).

    Model, optimizer and LR schedule come back through DeepSpeed; the data position is the step
    itself, since batches are a pure function of the step (``toolkit.data.batches``).
    """
    if not (folder / "latest").is_file():
        return 0
    path, client_state = engine.load_checkpoint(str(folder))
    if path is None:
        return 0
    step = int(client_state["step"])
    if dist.get_rank() == 0:
        log.warning("resumed from %s at step %d", path, step)
    return step


def consolidate(engine, tokenizer, out: Path) -> Path | None:
    """Write the engine's model to ``out`` as a Hugging Face model, tied weights kept tied.

    Every rank must call this; rank 0 writes and returns the folder, the others return None.
    """
    stage = engine.zero_optimization_stage()
    # DeepSpeed's per-module ZeRO-3 gather, the one accelerate and the HF Trainer use as well;
    # despite its name it returns the weights in the engine's training dtype.
    state = engine._zero3_consolidated_16bit_state_dict() if stage == 3 else engine.module.state_dict()
    if dist.get_rank() != 0:
        return None
    out.mkdir(parents=True, exist_ok=True)
    engine.module.save_pretrained(out, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out

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


def consolidate(engine, tokenizer, out: Path, checkpoints: Path, step: int) -> Path | None:
    """Write the engine's model to ``out`` as a Hugging Face model, tied weights kept tied.

    Every rank must call this, after :func:`save` of ``step`` into ``checkpoints``; rank 0 writes
    and returns the folder, the others return None. ZeRO-3 shards and AutoTP slices are gathered
    module by module (DeepSpeed's own gathers, the ones accelerate and the HF Trainer use too,
    which return weights in the training dtype); a pipeline is rebuilt from the checkpoint's
    per-layer files, since each rank only ever held its own stage.
    """
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if isinstance(engine, PipelineEngine):
        state = None
        dist.barrier()  # every stage's layer files are on disk
    elif engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    elif engine.autotp_size() > 1:
        state = engine._replace_module_consolidated_state_dict()
    else:
        state = engine.module.state_dict()
    if dist.get_rank() != 0:
        return None
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(engine, PipelineEngine):
        from toolkit.models.pipeline import consolidate as consolidate_pipeline

        consolidate_pipeline(checkpoints, engine.module.hf_config, out, tag=tag(step))
    else:
        engine.module.save_pretrained(out, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out

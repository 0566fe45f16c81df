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


def _frozen_base(engine) -> bool:
    from toolkit.models.lora import is_adapted

    return is_adapted(engine.module)


def save(engine, folder: Path, step: int) -> Path:
    """Save a DeepSpeed checkpoint of ``step`` (a collective call on every rank).

    A LoRA run saves its adapters and their optimizer state only: the frozen base is the model
    the run started from, reloaded from there on resume.
    """
    engine.save_checkpoint(str(folder), tag=tag(step), client_state={"step": step},
                           exclude_frozen_parameters=_frozen_base(engine))
    return folder / tag(step)


def resume(engine, folder: Path) -> int:
    """Load the newest checkpoint in ``folder`` into ``engine``; return its step (0 if none).

    Model, optimizer and LR schedule come back through DeepSpeed; the data position is the step
    itself, since batches are a pure function of the step (``toolkit.data.batches``).
    """
    if not (folder / "latest").is_file():
        return 0
    path, client_state = engine.load_checkpoint(str(folder), load_module_strict=not _frozen_base(engine))
    if path is None:
        return 0
    step = int(client_state["step"])
    if dist.get_rank() == 0:
        log.warning("resumed from %s at step %d", path, step)
    return step


def consolidate(engine, tokenizer, out: Path, checkpoints: Path, step: int) -> Path | None:
    """Write the engine's model to ``out`` as a Hugging Face model (tied weights kept tied), or a
    LoRA run's adapter in peft format.

    Every rank must call this, after :func:`save` of ``step`` into ``checkpoints``; rank 0 writes
    and returns the folder, the others return None. ZeRO-3 shards and AutoTP slices are gathered
    module by module (DeepSpeed's own gathers, the ones accelerate and the HF Trainer use too,
    which return weights in the training dtype); a pipeline is rebuilt from the checkpoint's
    per-layer files, since each rank only ever held its own stage.
    """
    from deepspeed.runtime.pipe.engine import PipelineEngine

    from toolkit.models import lora

    adapted = lora.is_adapted(engine.module)
    if isinstance(engine, PipelineEngine):
        state = None
        dist.barrier()  # every stage's layer files are on disk
    elif adapted:
        state = lora.trainable_state(engine.module)
    elif engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    elif engine.autotp_size() > 1:
        state = engine._replace_module_consolidated_state_dict()
    else:
        state = engine.module.state_dict()
    if dist.get_rank() != 0:
        return None
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(engine, PipelineEngine) and adapted:
        from toolkit.models.pipeline import consolidate_adapter

        state = consolidate_adapter(checkpoints, engine.module.hf_config, tag=tag(step))
        lora.save_pipeline_adapter(engine.module.hf_config, engine.module.peft_config, state, out)
    elif isinstance(engine, PipelineEngine):
        from toolkit.models.pipeline import consolidate as consolidate_pipeline

        consolidate_pipeline(checkpoints, engine.module.hf_config, out, tag=tag(step))
    elif adapted:
        lora.save_adapter(engine.module, state, out)
    else:
        engine.module.save_pretrained(out, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def consolidate_newest(root: Path) -> Path:
    """Consolidate a run's newest checkpoint, offline in one process, to ``consolidated/TAG``.

    For a run that has checkpoints but no ``final/`` (stopped early, or still running): ZeRO 1-3
    through DeepSpeed's own ``zero_to_fp32`` (the fp32 master weights), ZeRO-0 from the model
    states file, a pipeline from its per-layer files. Written aside and renamed into place.

    Raises:
        UserError: the run has no checkpoint, or it is an AutoTP checkpoint (its slices are only
            gathered by the live engine, into ``final/``).
    """
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from toolkit.errors import UserError
    from toolkit.models.loading import load_tokenizer
    from toolkit.rundir import RunDir

    run = RunDir(Path(root))
    latest = run.checkpoints / "latest"
    if not latest.is_file():
        raise UserError(f"{root}: the run has neither final/ nor a checkpoint", "train it (train.save_steps) first")
    name = latest.read_text().strip()
    out = run.root / "consolidated" / name
    if (out / "config.json").is_file():
        return out
    info = run.read_run()
    if info.get("lora"):
        raise UserError(f"{root}: a LoRA run's checkpoints hold its adapters only",
                        "let the run finish: its final/ is the adapter, which export merges into the base")
    if info["parallel"].get("tensor_parallel", 1) > 1:
        raise UserError(f"{root}: AutoTP checkpoints are not consolidated offline",
                        "let the run finish: its final/ is gathered by the live engine")
    model_path = info["model"]["path"]
    config = AutoConfig.from_pretrained(model_path)
    staging = out.with_name(f".{name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    folder = run.checkpoints / name
    if any(folder.glob("layer_*-model_states.pt")):
        from toolkit.models.pipeline import consolidate as consolidate_pipeline

        consolidate_pipeline(run.checkpoints, config, staging, tag=name)
    else:
        if info["parallel"]["zero_stage"] == 0:
            # DeepSpeed's own file, written by this run (weights_only: tensors and plain values only)
            state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(run.checkpoints), tag=name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False)
        model.tie_weights()
        params = model.state_dict()
        loaded = {params[key].data_ptr() for key in params if key not in missing}
        tied = {key for key in missing if params[key].data_ptr() in loaded}  # e.g. lm_head = embeddings
        if unexpected or set(missing) - tied:
            raise UserError(f"{folder}: checkpoint does not match the model (missing {sorted(set(missing) - tied)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]})", "was the run's model replaced?")
        model.save_pretrained(staging, safe_serialization=True)
    load_tokenizer(model_path).save_pretrained(staging)
    staging.replace(out)
    return out

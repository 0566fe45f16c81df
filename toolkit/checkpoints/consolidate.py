"""From a run's checkpoints to a standard Hugging Face model directory.

``final/`` (safetensors, config, tokenizer) is written by the live engine at the end of a run:
under ZeRO-3 each module's shards are gathered in turn and only rank 0 keeps the full state dict.
A run without ``final/`` (stopped early, or still running) is consolidated offline, in one
process, from its newest complete checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist

from toolkit.checkpoints.store import frozen_base, pick, tag
from toolkit.errors import UserError
from toolkit.models import lora
from toolkit.models.loading import load_tokenizer
from toolkit.models.pipeline import consolidate as consolidate_pipeline
from toolkit.models.pipeline import consolidate_adapter
from toolkit.rundir import RunDir


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

    adapted = frozen_base(engine)
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
        state = consolidate_adapter(checkpoints, engine.module.hf_config, tag=tag(step))
        lora.save_pipeline_adapter(engine.module.hf_config, engine.module.peft_config, state, out)
    elif isinstance(engine, PipelineEngine):
        consolidate_pipeline(checkpoints, engine.module.hf_config, out, tag=tag(step))
    elif adapted:
        lora.save_adapter(engine.module, state, out)
    else:
        engine.module.save_pretrained(out, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def consolidate_offline(root: Path, step: int | None = None, out: Path | None = None) -> Path:
    """Consolidate a run's checkpoint of ``step`` (default: its newest complete one), offline in one
    process, to ``out`` (default: ``RUN/consolidated/TAG``); return ``out``.

    For a run without ``final/`` (stopped early, still running, or its final save failed): ZeRO 1-3
    through DeepSpeed's own ``zero_to_fp32`` (the fp32 master weights), ZeRO-0 from the model
    states file, a pipeline from its per-layer files. The checkpoint is verified against its
    manifest first; the model is written aside and renamed into place.

    Raises:
        UserError: no such complete checkpoint (:func:`pick`), or one that is not consolidated offline (AutoTP
            slices and LoRA adapters are gathered by the live engine into ``final/``).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    run = RunDir(Path(root))
    chosen = pick(run.checkpoints, step)
    name = chosen.name
    out = Path(out) if out is not None else run.root / "consolidated" / name
    if (out / "config.json").is_file():
        return out
    info = run.read_run()
    if info.get("lora"):
        raise UserError(f"{root}: a LoRA run's checkpoints hold its adapters only",
                        "let the run finish: its final/ is the adapter, which export merges into the base")
    if info["parallel"].get("tensor_parallel", 1) > 1:
        raise UserError(f"{root}: AutoTP checkpoints are not consolidated offline",
                        "let the run finish: its final/ is gathered by the live engine")
    if info["parallel"].get("node_local_storage") and info["parallel"]["zero_stage"] > 0:
        raise UserError(f"{root}: this node-local run's checkpoint shards are spread over every node's disk",
                        f"copy each node's checkpoints/{name} into this one first, or let the run finish "
                        "(node 0 writes final/)")
    model_path = info["model"]["path"]
    config = AutoConfig.from_pretrained(model_path)
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    folder = run.checkpoints / name
    if any(folder.glob("layer_*-model_states.pt")):
        consolidate_pipeline(run.checkpoints, config, staging, tag=name)
    else:
        if info["parallel"]["zero_stage"] == 0:
            # DeepSpeed's own file, written by this run (weights_only: tensors and plain values only)
            state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import (
                get_fp32_state_dict_from_zero_checkpoint,
            )

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

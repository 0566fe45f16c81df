"""Per-rank worker: for every family, train a 2-stage pipeline and the unsplit HF model side by side.

Run by ``test_pipeline_multirank.py`` through ``deepspeed --num_gpus 2``. Every rank builds the same
seeded tiny model and trains an unsplit copy as the reference (cheap at this size), converts the
model to a 2-stage pipeline, trains it on the same batches with the same optimizer and clipping,
saves a pipeline checkpoint, and rank 0 consolidates it, reloads it with ``from_pretrained`` and
compares its logits with the pipeline's (computed on the last stage, sent to rank 0).
"""

from __future__ import annotations

import copy

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from tests.multirank import scratch_dir, write_result
from tests.toolkit.pipeline.tiny import VOCAB, micro_batches, tiny_config, tiny_model
from toolkit.models.pipeline import consolidate, to_pipeline

# SGD with momentum, not Adam: Adam's update is nearly blind to a wrong gradient scale.
# Clipping at DeepSpeed's default (1.0) is active at these sizes (norms are ~2.5).
STEPS, GRAD_ACCUM, CLIP, LR = 3, 2, 1.0, 0.5
# (model_type, tied embeddings, how the pipeline gets its weights, activation checkpoint interval)
CASES = [
    ("llama", False, "model", 1),
    ("mistral", False, "state_dict", 0),
    ("qwen2", True, "model", 0),
    ("gemma", True, "state_dict", 0),
    ("phi", False, "model", 0),
    ("gpt_neox", False, "state_dict", 0),
    ("gpt2", True, "model", 0),
    ("opt", True, "state_dict", 0),
]
DS_CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": GRAD_ACCUM,
             "gradient_clipping": CLIP, "steps_per_print": 10**9}


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def train_reference(model, steps) -> tuple[list[float], list[float]]:
    """Per-step mean micro-batch loss and pre-clip gradient norm of the unsplit HF model."""
    optimizer = make_optimizer(model.parameters())
    losses, norms = [], []
    for step in steps:
        optimizer.zero_grad()
        total = 0.0
        for (ids, mask), labels in step:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            (loss / GRAD_ACCUM).backward()
            total += loss.item() / GRAD_ACCUM
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        optimizer.step()
        losses.append(total)
    return losses, norms


def run_case(model_type: str, tie: bool, source: str, checkpoint_interval: int) -> dict:
    name = f"{model_type}-{'tied' if tie else 'untied'}"
    model = tiny_model(model_type, tie)
    steps = [micro_batches(GRAD_ACCUM, seed=s) for s in range(STEPS)]
    (probe_inputs, _), = probe = micro_batches(1, seed=99)
    expected, grad_norms = train_reference(copy.deepcopy(model), steps)

    if source == "model":
        module = to_pipeline(model, 2, activation_checkpoint_interval=checkpoint_interval)
    else:
        module = to_pipeline(tiny_config(model_type, tie), 2, weights=model.state_dict(),
                             activation_checkpoint_interval=checkpoint_interval)
    del model
    engine, *_ = deepspeed.initialize(model=module, config=DS_CONFIG,
                                      optimizer=make_optimizer(module.parameters()))
    losses = [float(engine.train_batch(iter(step))) for step in steps]
    _, logits = engine.eval_batch(iter(probe), return_logits=True, num_micro_batches=1)

    checkpoints = scratch_dir() / name
    engine.save_checkpoint(checkpoints)
    dist.barrier()
    result = {
        "case": name, "stage": engine.stage_id, "losses": losses, "expected": expected,
        "reference_grad_norms": grad_norms,
        "local_params": sum(p.numel() for p in module.parameters()),
        "planned_params": module.split.stage_params(engine.stage_id),
        "total_params": module.split.total_params(), "split": str(module.split),
    }
    # consolidate where save_pretrained writes (global rank 0), against the last stage's logits
    if not engine.is_last_stage():
        logits = torch.empty(*probe_inputs[0].shape, VOCAB)
    dist.broadcast(logits, src=dist.get_world_size() - 1)
    if dist.get_rank() == 0:
        consolidate(checkpoints, tiny_config(model_type, tie), checkpoints / "final")
        final = AutoModelForCausalLM.from_pretrained(checkpoints / "final")
        with torch.no_grad():
            final_logits = final(input_ids=probe_inputs[0], attention_mask=probe_inputs[1]).logits
        result["final_logits_max_diff"] = float((final_logits - logits).abs().max())
        result["final_tied"] = final.get_output_embeddings().weight is final.get_input_embeddings().weight
    dist.barrier()  # the next case's process groups are created collectively
    return result


def run_resume(model_type: str = "gpt2") -> dict:
    """Losses of 4 uninterrupted steps, and of 2 steps + checkpoint + 2 steps in a new engine.

    The resumed engine starts from another random init, so everything, the last stage's copy of
    the tied embedding (which DeepSpeed does not save) included, must come from the checkpoint.
    """
    steps = [micro_batches(GRAD_ACCUM, seed=s) for s in range(4)]

    def engine(seed: int):
        module = to_pipeline(tiny_config(model_type, True), 2, seed=seed)
        return deepspeed.initialize(model=module, config=DS_CONFIG, optimizer=make_optimizer(module.parameters()))[0]

    straight, first = engine(seed=1), engine(seed=1)
    uninterrupted = [float(straight.train_batch(iter(step))) for step in steps]
    resumed = [float(first.train_batch(iter(step))) for step in steps[:2]]
    first.save_checkpoint(scratch_dir() / "resume")
    dist.barrier()
    second = engine(seed=2)
    second.load_checkpoint(scratch_dir() / "resume")
    resumed += [float(second.train_batch(iter(step))) for step in steps[2:]]
    return {"uninterrupted": uninterrupted, "resumed": resumed}


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    write_result({"cases": [run_case(*case) for case in CASES], "resume": run_resume()})


if __name__ == "__main__":
    main()

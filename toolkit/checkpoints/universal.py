"""A checkpoint of one parallel layout made loadable under another: DeepSpeed's universal checkpoint.

A ZeRO checkpoint is cut for the layout that wrote it: each rank's file holds flat slices of the
fp32 weights and Adam moments of its partition. DeepSpeed's ``ds_to_universal`` rewrites it as one
folder per parameter (``zero/NAME/fp32.pt``, ``exp_avg.pt``, ``exp_avg_sq.pt``, ``step.pt``) plus
the model-states file (LR schedule, client state); an engine configured with
``load_universal_checkpoint`` slices those for whatever ranks and ZeRO stage it runs now. The step,
and with it the data position (``toolkit.data.batches``), travels in the client state.

Universal copies live in ``checkpoints/universal/step_NNNNNN``, written aside and renamed into place
with a manifest of hashes like every checkpoint (``toolkit.checkpoints.store``). Only a checkpoint
whose own manifest verifies is converted: DeepSpeed's converter unpickles its files.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
from pathlib import Path

from data_checks.files import sha256_file
from toolkit.checkpoints.store import MANIFEST, universal_copy, why_incomplete, write_manifest
from toolkit.errors import UserError

# What a layout change may involve: DeepSpeed's universal format covers ZeRO 1-3 data parallelism
# and pipelines (dstk renames the pipeline's parameters to the model's and back). AutoTP
# checkpoints need the model's slicing rules, and ZeRO-0 holds torch's optimizer state instead of
# ZeRO partitions.
_UNSUPPORTED = {
    "tensor_parallel": lambda v: v > 1,
    "zero_stage": lambda v: v == 0,
}


def why_not_convertible(was: dict, now: dict) -> str | None:
    """Why a checkpoint saved under layout ``was`` cannot resume under ``now``, or None if it can."""
    for key, unsupported in _UNSUPPORTED.items():
        for side, layout in (("saved with", was), ("resumed with", now)):
            if key in layout and unsupported(layout[key]):
                return (f"a checkpoint {side} parallel.{key}={layout[key]} cannot change layout (DeepSpeed's "
                        f"universal checkpoints cover ZeRO stages 1-3 and pipelines, not ZeRO-0 or AutoTP)")
    return None


# The model-states files (LR schedule, client state; the weights come from zero/), one per model-
# parallel rank (pipeline stage), have ZeRO-3 names and ZeRO 1-2 names, and a loading engine looks
# for its own stage's.
_ZERO3_STATES = "zero_pp_rank_0_"


def _name_states_for_every_stage(folder: Path) -> None:
    for states in list(folder.glob("mp_rank_*_model_states.pt")):
        other = folder / f"{_ZERO3_STATES}{states.name}"
        if not other.exists():
            os.link(states, other)  # the same file under the other name, no second copy
    for states in list(folder.glob(f"{_ZERO3_STATES}mp_rank_*_model_states.pt")):
        other = folder / states.name.removeprefix(_ZERO3_STATES)
        if not other.exists():
            os.link(states, other)


def _optimizer_state_for_every_stage(zero: Path) -> None:
    """Make ``zero/`` loadable by both of DeepSpeed's universal loaders.

    DeepSpeed 0.19.8 writes the optimizer's common state one way from a ZeRO 1-2 checkpoint (the
    step in each parameter's ``step.pt``, hyperparameters in ``param_groups``) and another from a
    ZeRO-3 one (``optimizer_state_dict`` with the step of sub-group 0, no ``step.pt``, no
    ``ds_version``, each state a flat tensor instead of ``{"param": shaped tensor}``; from CPU
    offload the step is an int, which torch's fused AdamW refuses), and each stage's loader reads
    only its own: resuming across them would fail, or restart Adam's bias
    correction at step 0. This writes what either reads.
    """
    import deepspeed
    import torch

    path = zero / "optimizer_state.pt"
    state = torch.load(path, weights_only=False)  # written by the converter a moment ago
    inner = state.pop("optimizer_state_dict", None)
    state.pop("fp32_flat_groups", None)  # rank 0's flat partition; zero/NAME/fp32.pt holds every weight
    if inner is not None:
        step = inner["state"][0]["step"]
        state.setdefault("param_groups", inner["param_groups"])
    else:
        step = torch.load(next(zero.glob("*/step.pt")), weights_only=False)
    step = torch.as_tensor(step, dtype=torch.float32)
    state.setdefault("ds_version", deepspeed.__version__)
    state["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": state["param_groups"]}
    torch.save(state, path)
    shapes = {}  # ZeRO-3's states are written flat, and the ZeRO 1-2 loader wants them shaped
    for group in torch.load(zero.parent / "mp_rank_00_model_states.pt", weights_only=False).get("param_shapes") or []:
        shapes.update(group)
    for parameter in (folder for folder in zero.iterdir() if (folder / "fp32.pt").is_file()):
        torch.save(step, parameter / "step.pt")  # a tensor: torch's AdamW refuses DeepSpeed CPU Adam's int
        for kind in ("fp32", "exp_avg", "exp_avg_sq"):
            if not (parameter / f"{kind}.pt").is_file():  # a tied duplicate: its weights only
                continue
            value = torch.load(parameter / f"{kind}.pt", weights_only=False)
            if isinstance(value, torch.Tensor):
                torch.save({"param": value.view(shapes.get(parameter.name, value.shape))}, parameter / f"{kind}.pt")


def _manifest(checkpoint: Path) -> dict:
    return json.loads((checkpoint / MANIFEST).read_text())


def _why_not_universal(checkpoint: Path) -> str | None:
    layout = _manifest(checkpoint).get("layout", {})
    if not any(checkpoint.glob("*optim_states.pt")):  # torch's optimizer state, in the model-states file
        layout = {**layout, "zero_stage": 0}
    return why_not_convertible(layout, layout)


def _is_pipeline(checkpoint: Path) -> bool:
    return any(checkpoint.glob("layer_*-model_states.pt"))


def _rename_parameters(zero: Path, names: dict[str, str]) -> None:
    """Rename ``zero/``'s parameter folders by ``names`` (old -> new); others stay as they are."""
    for old, new in names.items():
        if (zero / old).is_dir():
            (zero / old).rename(zero / new)


def convert(checkpoint: Path, model_path: str, pipeline: bool = False) -> Path:
    """Write the universal copy of ``checkpoint`` and return it; an existing copy of it for the same
    target is reused. ``checkpoint`` must have verified against its manifest (``store.pick`` or
    ``store.newest_complete`` chose it): the converter unpickles its files.

    Args:
        model_path: the run's model (its config maps a pipeline's parameter names to the model's).
        pipeline: name the parameters as the pipeline module of the model does, for a pipeline
            run to load; else as the Hugging Face model does.

    Raises:
        UserError: the checkpoint has no universal form.
    """
    out = universal_copy(checkpoint)
    # a copy is of this very checkpoint, not of an earlier save of its step (before a rollback)
    source = sha256_file(checkpoint / MANIFEST) if (checkpoint / MANIFEST).is_file() else None
    target = {"of_manifest": source, "pipeline_names": pipeline}
    if out.is_dir() and why_incomplete(out) is None and target.items() <= _manifest(out)["layout"].items():
        return out
    problem = _why_not_universal(checkpoint)
    if problem is not None:
        raise UserError(f"checkpoint {checkpoint} has no universal form: {problem}",
                        "convert it to a Hugging Face model instead (--to hf) and start a new run from it")
    from deepspeed.checkpoint import ds_to_universal

    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(checkpoint), output_folder=str(staging), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              # dstk's models carry no Megatron-style slicing info: plain data parallelism
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints its progress per stage
        ds_to_universal.main(args)
    if _is_pipeline(checkpoint) or pipeline:
        from transformers import AutoConfig

        from toolkit.models.pipeline.convert import parameter_names

        names = parameter_names(AutoConfig.from_pretrained(model_path))
        if _is_pipeline(checkpoint):
            _rename_parameters(staging / "zero", names)
        if pipeline:
            _rename_parameters(staging / "zero", {hf: piped for piped, hf in names.items()})
    for rng in checkpoint.glob("rng_state_rank*.pt"):  # each rank's dropout state, where ranks persist
        shutil.copy2(rng, staging)
    _name_states_for_every_stage(staging)
    _optimizer_state_for_every_stage(staging / "zero")
    manifest = _manifest(checkpoint)
    write_manifest(staging, manifest["step"], manifest.get("metrics", {}),
                   {**manifest.get("layout", {}), "universal": True, **target}, manifest.get("layouts"))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out

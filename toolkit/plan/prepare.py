"""Planning a run before any worker starts: from a validated recipe to a prepared run directory.

``prepare`` checks everything it can without writing (output directory state, model, data,
DeepSpeed config, parallel layout), runs the audit gate, and only then writes ``recipe.yaml``,
``ds_config.json`` and ``run.json`` (status ``prepared``): so bad input leaves an existing output
directory untouched. Those three files are all a worker reads (see ``toolkit.launching.worker``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

from data_checks.files import sha256_file
from toolkit.checkpoints import store as checkpoint
from toolkit.checkpoints import universal
from toolkit.data import builtin
from toolkit.errors import AuditFailed, UserError
from toolkit.models.loading import ModelRef, resolve_model
from toolkit.models.presets import build_preset
from toolkit.plan import ds_config as ds_config_module
from toolkit.plan import layout
from toolkit.plan.gate import run_gate, token_counter
from toolkit.plan.lineage import git_commit, versions
from toolkit.recipe import BUILTIN_PREFIX, Recipe, with_values
from toolkit.rundir import RunDir


def prepare(recipe: Recipe, audited: dict | None = None) -> dict:
    """Make ``recipe.output_dir`` ready for workers; return its run.json content.

    Args:
        audited: the audit entry of node 0 in a multi-node run, for a node that prepares its own
            (node-local) run directory: its data is then checked by hash, not audited again.

    Raises:
        UserError: bad recipe values, data or output directory state (exit 2), nothing written.
        AuditFailed: the data audit failed (exit 1); only ``audit/`` is written.
    """
    run_dir = RunDir(Path(recipe.output_dir))
    existing = _existing_run(run_dir, recipe)
    resumed = _resume_point(run_dir, recipe) if recipe.resume == "auto" and run_dir.run_json.is_file() else None
    if resumed is not None:
        recipe = _keep_global_batch(recipe, *resumed)
    if existing is not None:
        _convert_for(recipe, resumed, run_dir)  # again, should the copy have gone since it was prepared
        return existing
    source, config, parallel = validate(recipe)
    data = resolve_all_data(recipe)
    audit_entry = audited if audited is not None else _audit(recipe, source, data, run_dir)
    layouts = _layouts(run_dir, recipe, resumed)
    run_dir.root.mkdir(parents=True, exist_ok=True)
    for entry in data.values():
        if entry["source"].startswith(BUILTIN_PREFIX):  # the run keeps its own copy of generated data
            run_dir.data.mkdir(exist_ok=True)
            entry["path"] = shutil.copy(entry["path"], run_dir.data)
    if source.kind == "preset":
        model_path = str(build_preset(source.name, run_dir.base_model, recipe.train.seed))
    else:
        model_path = source.name
    run_dir.recipe.write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
    run_dir.ds_config.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    run = {
        "status": "prepared",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe_sha256": recipe.sha256(),
        "versions": versions(),
        "git_commit": git_commit(),
        "model": {"source": source.kind, "name": source.name, "path": model_path},
        "trust_remote_code": recipe.trust_remote_code,
        "lora": recipe.lora.model_dump(mode="json") if recipe.lora.enabled else None,
        "data": data,
        "audit": audit_entry,
        "parallel": {**parallel, "ds_config_template": recipe.parallel.ds_config
                     or f"ds_configs/{ds_config_module.template_name(recipe)}.json"},
        "layouts": layouts,
    }
    if run_dir.run_json.is_file():  # resumed: the first attempt's evaluation before training stays
        run.update({key: value for key, value in run_dir.read_run().items() if key == "eval_before"})
    run_dir.write_run(run)
    return run


def validate(recipe: Recipe) -> tuple[ModelRef, dict, dict]:
    """Check the recipe against its model without reading data or writing anything: the model
    resolves, the DeepSpeed config fills, the parallel layout fits the model.

    Returns:
        The model's :class:`ModelRef`, the filled DeepSpeed config and the layout for run.json.

    Raises:
        UserError: what cannot run, with the reason.
    """
    source = resolve_model(recipe.model, recipe.trust_remote_code)
    model_config = layout.model_config(recipe, source)
    config = ds_config_module.build(recipe, getattr(model_config, "hidden_size", None))
    return source, config, layout.describe(recipe, model_config)


def _audit(recipe: Recipe, source, data: dict, run_dir: RunDir) -> dict:
    with tempfile.TemporaryDirectory(prefix="dstk-audit-") as staging:
        # The report is written aside and published once the data proved readable (a pass or a
        # fail), so unreadable input leaves an existing run directory untouched.
        try:
            entry = run_gate(recipe, data["train"]["path"], data.get("eval", {}).get("path"),
                             Path(staging), run_dir.audit, count_tokens=token_counter(recipe, source))
        except AuditFailed:
            _publish(Path(staging), run_dir)
            raise
        _publish(Path(staging), run_dir)
    return entry


def _publish(report: Path, run_dir: RunDir) -> None:
    if any(report.iterdir()):  # nothing when the gate is off
        run_dir.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(run_dir.audit, ignore_errors=True)
        shutil.copytree(report, run_dir.audit)


def _existing_run(run_dir: RunDir, recipe: Recipe) -> dict | None:
    if not run_dir.root.exists():
        return None
    if not run_dir.run_json.is_file():
        if any(run_dir.root.iterdir()):
            raise UserError(f"output_dir {run_dir.root} exists and is not a dstk run directory",
                            "choose another output_dir")
        return None
    run = run_dir.read_run()
    if run.get("recipe_sha256") == recipe.sha256() and run.get("status") == "prepared":
        return run  # prepared by `dstk train` for these very workers
    done = run.get("result", {}).get("steps") if run.get("status") == "completed" else None
    latest = run_dir.checkpoints / "latest"  # `dstk rollback` points it at an earlier step
    at = int(latest.read_text().strip().removeprefix("step_")) if latest.is_file() else done
    if recipe.resume == "auto" and (done is None or recipe.train.max_steps > min(done, at)):
        return None  # re-check data and audit, then continue from the newest checkpoint
    if done is not None:  # a finished run's record is never rewritten by a run that adds nothing
        raise UserError(f"output_dir {run_dir.root} holds a completed run of {done} steps (its model: "
                        f"{run_dir.final})", f"pass output_dir=NEW for a new run, or resume=auto with "
                        f"train.max_steps above {done} to train it further (or after `dstk rollback`)")
    raise UserError(f"output_dir {run_dir.root} already holds a run ({run.get('status')})",
                    "pass resume=auto to continue it, or output_dir=NEW for a new run")


def _resume_point(run_dir: RunDir, recipe: Recipe) -> tuple[Path, dict] | None:
    """The checkpoint a resumed run continues from and the layout it was written in, checked against
    the recipe (None: a fresh start).

    A checkpoint of another model is refused. One of another sharding is accepted where its
    universal copy can carry it over (``toolkit.checkpoints.universal``), at the global batch it
    was trained with, since its step counts the data position in those batches.

    Raises:
        UserError: another model, a layout change DeepSpeed cannot convert, or another global batch.
    """
    chosen = checkpoint.newest_complete(run_dir.checkpoints) if run_dir.checkpoints.is_dir() else None
    if chosen is None:
        return None
    run = run_dir.read_run()
    model = resolve_model(recipe.model, recipe.trust_remote_code).name
    if run.get("model", {}).get("name") not in (None, model):
        raise UserError(f"output_dir {run_dir.root} holds checkpoints of model {run['model']['name']}, "
                        f"not {model}", f"resume with model={run['model']['name']}, or use a new output_dir")
    was = checkpoint.written_layout(chosen, run)
    now = checkpoint.layout_of(recipe)
    changed = checkpoint.resharded(was, now)
    problem = universal.why_not_convertible(was, now) if changed else None
    piped = max(was.get("pipeline_stages", 1), now["pipeline_stages"]) > 1
    if problem is None and changed and recipe.lora.enabled and piped:
        problem = "dstk does not map a LoRA pipeline's adapter names to the model's yet"
    if problem is None and changed and recipe.parallel.node_local_storage:
        problem = "node-local checkpoints are spread over every node's disk, and conversion needs them in one place"
    if problem:
        raise UserError(f"output_dir {run_dir.root} holds checkpoints sharded for another layout "
                        f"({', '.join(changed)}): {problem}",
                        f"resume with the layout that wrote them, or start a new run from its model "
                        f"(model={run_dir.final}, or `dstk checkpoints convert {run_dir.root}`)")
    return chosen, was


def _keep_global_batch(recipe: Recipe, resumed: Path, was: dict) -> Recipe:
    """The recipe at the global batch ``resumed`` was trained with, whose step counts the data
    position in those batches: as it is, or with ``train.grad_accum`` changed for an elastic run.

    Raises:
        UserError: another global batch, which an elastic run cannot reach by accumulation either.
    """
    wanted = was.get("global_batch")
    now = checkpoint.layout_of(recipe)["global_batch"]
    if wanted is None or wanted == now:
        return recipe
    per_accumulation = recipe.train.micro_batch_size * recipe.data_parallel
    if recipe.parallel.elastic and wanted % per_accumulation == 0:
        accumulation = wanted // per_accumulation
        print(f"dstk: train.grad_accum {recipe.train.grad_accum} -> {accumulation}, keeping the checkpoint's "
              f"global batch of {wanted} records on {recipe.data_parallel} data-parallel rank(s)", flush=True)
        return with_values(recipe, {"train.grad_accum": accumulation})
    hint = f" (train.grad_accum={wanted // per_accumulation})" if wanted % per_accumulation == 0 else ""
    raise UserError(f"checkpoint {resumed.name} was trained with global batches of {wanted} records and the "
                    f"recipe's are {now}, so its step would point at other data",
                    f"keep train.micro_batch_size x train.grad_accum x data-parallel ranks = {wanted}{hint}, "
                    "or set parallel.elastic=true")


def _layouts(run_dir: RunDir, recipe: Recipe, resumed: tuple[Path, dict] | None) -> list[dict]:
    """Every layout the run has had, each from the step it started at (the resume checkpoint is
    converted for the recipe's layout here, after the audit passed and before any worker starts)."""
    now = checkpoint.layout_of(recipe)
    if resumed is None:
        return [{"from_step": 0, **now}]
    _convert_for(recipe, resumed, run_dir)
    saved, was = resumed
    history = run_dir.read_run().get("layouts") or [{"from_step": 0, **was}]
    latest = {key: value for key, value in history[-1].items() if key != "from_step"}
    return history if latest == now else [*history, {"from_step": checkpoint.step_of(saved), **now}]


def _convert_for(recipe: Recipe, resumed: tuple[Path, dict] | None, run_dir: RunDir) -> None:
    """Write the universal copy of the resume checkpoint where the recipe shards it otherwise."""
    if resumed is None:
        return
    saved, was = resumed
    changed = checkpoint.resharded(was, checkpoint.layout_of(recipe))
    if changed:
        print(f"dstk: converting checkpoint {saved.name} for the new layout ({', '.join(changed)})", flush=True)
        universal.convert(saved, run_dir.read_run()["model"]["path"], pipeline=recipe.parallel.pipeline_stages > 1)


def resolve_all_data(recipe: Recipe) -> dict:
    """Each data split's source, local path and sha256 (generated data is generated first)."""
    return {split: _resolve_data(recipe, split)
            for split in ("train", "eval") if getattr(recipe.data, split) is not None}


def _resolve_data(recipe: Recipe, split: str) -> dict:
    location = getattr(recipe.data, split)
    if location.startswith(BUILTIN_PREFIX):
        path = builtin.materialize(location, split)
        return {"source": location, "path": path, "sha256": sha256_file(Path(path))}
    path = Path(location)
    if path.is_file():
        return {"source": location, "path": str(path.resolve()), "sha256": sha256_file(path)}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"source": location, "path": str(path.resolve()),
                "sha256": {str(p.relative_to(path)): sha256_file(p) for p in files}}
    if path.suffix or location.startswith((".", "/", "~")):
        raise UserError(f"data.{split} file {location} does not exist",
                        f"check the path, or use {BUILTIN_PREFIX}reverse for the built-in task")
    return {"source": location, "path": location, "sha256": None}  # a hub id, hashed by its revision

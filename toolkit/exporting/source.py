"""What a path given as a model is: a Hugging Face causal LM, a LoRA adapter, or a dstk run directory.

Export starts here, so that a wrong path fails with one line before any weights are read: only
``config.json``, ``adapter_config.json`` and ``run.json`` are parsed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from data_checks.files import sha256_file
from toolkit.checkpoints.consolidate import consolidate_offline
from toolkit.errors import UserError
from toolkit.models.loading import check_causal_lm, check_weights
from toolkit.rundir import RunDir

ADAPTER_FILE = "adapter_config.json"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model path.

    Attributes:
        path: the path as the user gave it.
        kind: ``"model"`` (an HF model directory), ``"adapter"`` (a peft LoRA adapter) or ``"run"``
            (a dstk run directory; its ``final/`` is the model or adapter).
        model_dir: the full-precision model: the directory itself, or the adapter's base model.
        adapter_dir: the LoRA adapter to merge into ``model_dir``, if any.
        run_dir: the run directory, if the source is a run.
    """

    path: Path
    kind: str
    model_dir: Path
    adapter_dir: Path | None = None
    run_dir: Path | None = None


def resolve(path: str | Path, *, trust_remote_code: bool = False) -> ModelSource:
    """Resolve a model, adapter or run directory and check that it holds a causal LM.

    Args:
        path: a model directory, a LoRA adapter directory or a dstk run directory.
        trust_remote_code: accept models whose class is defined by code in the directory.

    Returns:
        The resolved :class:`ModelSource`.

    Raises:
        UserError: the path is missing, is not a model, is not a causal LM, or is a run with
            neither ``final/`` nor a checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such directory", "give a model directory, a LoRA adapter or a run directory")
    run_dir = None
    if RunDir(path).run_json.is_file():
        run_dir, final = path, RunDir(path).final
        if not final.is_dir():  # stopped early or still running: its newest checkpoint, consolidated
            final = consolidate_offline(path)
        path = final
    if (path / ADAPTER_FILE).is_file():
        base = _adapter_base(path)
        check_causal_lm(base, trust_remote_code=trust_remote_code)
        kind = "run" if run_dir else "adapter"
        return ModelSource(Path(path), kind, base, adapter_dir=path, run_dir=run_dir)
    check_causal_lm(path, trust_remote_code=trust_remote_code)
    check_weights(path)
    return ModelSource(path, "run" if run_dir else "model", path, run_dir=run_dir)


def lineage(source: ModelSource) -> dict:
    """Where a model came from: paths, the run's ``run.json`` (hash and content) and audit verdict."""
    info: dict = {"source": str(source.path), "kind": source.kind, "model_dir": str(source.model_dir)}
    if source.adapter_dir:
        info["adapter_dir"] = str(source.adapter_dir)
    if source.run_dir:
        run = RunDir(source.run_dir)
        info["run_dir"] = str(source.run_dir)
        info["run_json_sha256"] = sha256_file(run.run_json)
        # run.json already records the data file hashes, manifest and gate verdict of the run.
        info["run"] = _read_json(run.run_json, what="run lineage")
        report = run.audit / "report.json"
        info["audit_verdict"] = _read_json(report, what="audit report").get("verdict") if report.is_file() else None
    return info


def _adapter_base(adapter_dir: Path) -> Path:
    base = _read_json(adapter_dir / ADAPTER_FILE, what="adapter config").get("base_model_name_or_path")
    if not base:
        raise UserError(f"{adapter_dir}: adapter_config.json names no base_model_name_or_path", "set it to the base model's directory")
    base_dir = Path(base)
    if not base_dir.is_absolute() and not base_dir.is_dir():
        base_dir = adapter_dir / base  # a path relative to the adapter
    if not base_dir.is_dir():
        raise UserError(
            f"{adapter_dir}: base model {base!r} is not a local directory",
            "set base_model_name_or_path in adapter_config.json to the base model's directory",
        )
    return base_dir


def _read_json(path: Path, *, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path.parent}: no {path.name} ({what})", "give a Hugging Face model directory or a dstk run")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})", f"repair or regenerate the {what}") from err

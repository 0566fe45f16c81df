"""DeepSpeed checkpoints of a run, crash-safe: save, verify, list, prune, roll back, resume.

Checkpoints are DeepSpeed's own (``checkpoints/step_NNNNNN`` and ``latest``), so DeepSpeed's
tools work on them. A crash must never cost a checkpoint that was complete, so each one is
written under a hidden name (``.step_NNNNNN.partial``), then its files are flushed and listed with
their sizes and sha256 in ``dstk_manifest.json``, then it is renamed into place, and only then
does ``latest`` (replaced atomically) point at it. A checkpoint counts as complete only when its
manifest verifies; resume skips any other with a warning naming it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from data_checks.files import sha256_file
from toolkit.errors import UserError
from toolkit.models.lora import is_adapted

log = logging.getLogger(__name__)

MANIFEST = "dstk_manifest.json"
LATEST = "latest"
UNIVERSAL = "universal"  # the folder of universal copies (toolkit.checkpoints.universal)
# What a checkpoint's files are cut for: its shards, and with offload another optimizer's state
# (DeepSpeed's CPU Adam): loading it under other values needs its universal copy
SHARDING = ("nproc", "zero_stage", "pipeline_stages", "tensor_parallel", "offload")


def layout_of(recipe) -> dict:
    """The layout a recipe's checkpoints are written in, recorded in each manifest: the sharding
    and offload, and the global batch that the data position (the step) counts in."""
    p, t = recipe.parallel, recipe.train
    return {**{key: getattr(p, key) for key in SHARDING},
            "global_batch": t.micro_batch_size * t.grad_accum * recipe.data_parallel}


def resharded(was: dict, now: dict) -> list[str]:
    """The sharding keys that differ between layouts ``was`` and ``now``, as ``key was -> now``."""
    return [f"parallel.{key} {was[key]} -> {now[key]}" for key in SHARDING if key in was and was[key] != now[key]]


def written_layout(checkpoint: Path, run: dict) -> dict:
    """The layout ``checkpoint`` was written in: its manifest's, or for checkpoints written before
    dstk recorded it there, the run's (``run`` is run.json: the layout that trained the checkpoint's
    step, or the run's only one)."""
    try:
        layout = json.loads((checkpoint / MANIFEST).read_text()).get("layout")
    except (OSError, ValueError):
        layout = None
    if layout is None:
        trained = [entry for entry in run.get("layouts", []) if entry["from_step"] < step_of(checkpoint)]
        layout = trained[-1] if trained else run.get("parallel", {})
    return {key: layout[key] for key in (*SHARDING, "global_batch") if key in layout}


def tag(step: int) -> str:
    return f"step_{step:06d}"


def universal_copy(checkpoint: Path) -> Path:
    """Where the universal copy of ``checkpoint`` (``checkpoints/step_N``) lives
    (``toolkit.checkpoints.universal`` writes it)."""
    return checkpoint.parent / UNIVERSAL / checkpoint.name


def step_of(checkpoint: Path) -> int:
    """The step of ``checkpoints/step_NNNNNN`` (or of its hidden ``.step_NNNNNN.partial``)."""
    return int(checkpoint.name.strip(".").removesuffix(".partial").removeprefix("step_"))


def frozen_base(engine) -> bool:
    return is_adapted(engine.module)


def save(engine, folder: Path, step: int, metrics: dict | None = None, keep_last: int = 0,
         keep_best: int = 0, layout: dict | None = None, layouts: list[dict] | None = None) -> Path:
    """Save a DeepSpeed checkpoint of ``step`` crash-safely (a collective call on every rank).

    ``metrics`` (the step's loss and eval loss) go into the manifest, for listing and keep-best,
    with ``layout`` (:func:`layout_of`), which tells a resume under another layout to convert it, and
    ``layouts``, every layout the run has had (run.json's lineage);
    then older checkpoints are pruned (:func:`prune`). A LoRA run saves its adapters and their
    optimizer state only: the frozen base is the model the run started from, reloaded from there
    on resume.
    """
    name = tag(step)
    staging = f".{name}.partial"
    leader = _storage_leader(engine)
    if leader:
        for left in folder.glob(".step_*.partial"):  # left by a run killed while saving
            shutil.rmtree(left, ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(str(folder), tag=staging, client_state={"step": step}, save_latest=False,
                           exclude_frozen_parameters=frozen_base(engine))
    _save_rng_state(folder / staging)
    dist.barrier()  # every rank's files are written
    if leader:
        write_manifest(folder / staging, step, metrics or {}, layout, layouts)
        shutil.rmtree(folder / name, ignore_errors=True)  # an older save of this step (after a rollback)
        (folder / staging).rename(folder / name)
        _fsync_dir(folder)
        point_latest(folder, name)
        prune(folder, keep_last, keep_best)
    dist.barrier()
    return folder / name


def _storage_leader(engine) -> bool:
    """Whether this rank publishes checkpoints (manifest, rename, ``latest``, pruning) on its storage.

    Rank 0 on shared storage; with node-local storage every node's local rank 0, for the files
    its own node's ranks wrote.
    """
    if engine.use_node_local_storage():
        return int(os.environ.get("LOCAL_RANK", "0")) == 0
    return dist.get_rank() == 0


def _rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"rng_state_rank{rank:05d}.pt"


def _save_rng_state(checkpoint: Path) -> None:
    """This rank's random generators (dropout draws), which DeepSpeed's checkpoint does not hold."""
    import random

    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    checkpoint.mkdir(parents=True, exist_ok=True)
    torch.save(state, _rng_file(checkpoint, dist.get_rank()))


def _load_rng_state(checkpoint: Path) -> None:
    import random

    import torch

    path = _rng_file(checkpoint, dist.get_rank())
    if not path.is_file():  # saved by another number of ranks, or before dstk saved RNG states
        log.warning("%s has no random state for rank %d: dropout draws will differ from the "
                    "uninterrupted run", checkpoint, dist.get_rank())
        return
    state = torch.load(path, weights_only=True)  # tensors and plain values only, never code
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def prune(folder: Path, keep_last: int, keep_best: int) -> list[Path]:
    """Delete checkpoints outside the keep policy; return them.

    With ``keep_last`` N > 0 the newest N checkpoints up to the one ``latest`` names are kept, plus
    the ``keep_best`` ones of lowest eval loss; checkpoints after ``latest`` (left by a rollback)
    and incomplete ones are left alone. ``keep_last`` 0 keeps everything.
    """
    if not keep_last:
        return []
    current = (folder / LATEST).read_text().strip()
    # judged by their manifests, not re-hashed: hashing every checkpoint at every save costs too much
    listed = [entry for entry in list_checkpoints(folder, hashes=False) if entry["state"] == "complete"]
    earlier = [entry for entry in listed if entry["name"] <= current]
    keep = {current} | {entry["name"] for entry in earlier[-keep_last:]}
    ranked = sorted((entry for entry in listed if entry["eval_loss"] is not None), key=lambda e: e["eval_loss"])
    keep |= {entry["name"] for entry in ranked[:keep_best]}
    removed = [folder / entry["name"] for entry in earlier if entry["name"] not in keep]
    for path in removed:
        shutil.rmtree(path)
        shutil.rmtree(universal_copy(path), ignore_errors=True)  # made only for a resume on another layout
    return removed


def list_checkpoints(folder: Path, hashes: bool = True) -> list[dict]:
    """Every checkpoint folder in ``folder``, oldest first: step, metrics, size and whether it verifies.

    Each entry: ``name``, ``step``, ``loss``, ``eval_loss``, ``bytes``, ``state`` (``complete``,
    ``partial`` for an unfinished save, else why it does not verify) and ``latest``. Without
    ``hashes`` a checkpoint with a readable manifest counts as complete.
    """
    latest = (folder / LATEST).read_text().strip() if (folder / LATEST).is_file() else None
    entries = []
    for path in sorted([*folder.glob("step_*"), *folder.glob(".step_*.partial")],
                       key=lambda p: p.name.strip(".").removesuffix(".partial")):
        partial = path.name.endswith(".partial")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            manifest = {}
        metrics = manifest.get("metrics", {})
        entries.append({
            "name": path.name, "step": step_of(path),
            "loss": metrics.get("loss"), "eval_loss": metrics.get("eval_loss"),
            "bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
            "state": "partial" if partial else (why_incomplete(path) if hashes else None if manifest else f"no readable {MANIFEST}")
            or "complete", "latest": path.name == latest,
        })
    return entries


def rollback(folder: Path, step: int) -> Path:
    """Make checkpoint ``step`` the one ``resume=auto`` continues from; later ones are kept.

    Raises:
        UserError: there is no such checkpoint, or it does not verify.
    """
    target = folder / tag(step)
    if not target.is_dir():
        steps = [entry["step"] for entry in list_checkpoints(folder) if entry["state"] == "complete"]
        raise UserError(f"{folder}: no checkpoint of step {step}",
                        f"complete checkpoints: {', '.join(map(str, steps)) or 'none'}")
    problem = why_incomplete(target)
    if problem is not None:
        raise UserError(f"{target} is not a complete checkpoint: {problem}", "roll back to another step")
    point_latest(folder, target.name)
    return target


def write_manifest(checkpoint: Path, step: int, metrics: dict, layout: dict | None = None,
                   layouts: list[dict] | None = None) -> None:
    """List every file of ``checkpoint`` with its size and sha256, flushing each to disk first."""
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
        files[str(path.relative_to(checkpoint))] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"step": step, "metrics": metrics, **({"layout": layout} if layout else {}),
                **({"layouts": layouts} if layouts else {}), "files": files}
    _write_atomically(checkpoint / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def point_latest(folder: Path, name: str) -> None:
    """Make ``name`` the checkpoint that ``resume=auto`` continues from (DeepSpeed's ``latest`` file)."""
    _write_atomically(folder / LATEST, name)


def why_incomplete(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` is not complete (missing manifest, file, size or hash), or None if it is."""
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"no readable {MANIFEST}"
    for relative, expected in manifest["files"].items():
        path = checkpoint / relative
        if not path.is_file():
            return f"{relative} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{relative} has {path.stat().st_size} bytes, the manifest says {expected['size']}"
        if sha256_file(path) != expected["sha256"]:
            return f"{relative} does not match its sha256"
    return None


def newest_complete(folder: Path) -> Path | None:
    """The checkpoint to resume from: the one ``latest`` names if complete, else the newest complete one.

    Every incomplete or corrupt checkpoint passed over is named in a warning.
    """
    latest = folder / LATEST
    named = folder / latest.read_text().strip() if latest.is_file() else None
    candidates = sorted(folder.glob("step_*"), reverse=True)
    if named is not None:
        candidates = [named] + [c for c in candidates if c != named]
    for candidate in candidates:
        problem = why_incomplete(candidate)
        if problem is None:
            return candidate
        log.warning("skipping checkpoint %s: %s", candidate, problem)
    return None


def pick(folder: Path, step: int | None) -> Path:
    """The checkpoint of ``step`` in ``folder``, verified, or the newest complete one when ``step`` is None.

    Raises:
        UserError: no such checkpoint, or it does not verify against its manifest.
    """
    if step is None:
        chosen = newest_complete(folder) if folder.is_dir() else None
        if chosen is None:
            raise UserError(f"{folder.parent}: the run has no complete checkpoint", "train it (train.save_steps) first")
        return chosen
    chosen = folder / tag(step)
    problem = why_incomplete(chosen) if chosen.is_dir() else "there is no such checkpoint"
    if problem:
        raise UserError(f"{folder.parent}: checkpoint of step {step} is not usable: {problem}",
                        "`dstk checkpoints RUN` lists the complete ones")
    return chosen


def resume(engine, folder: Path, run: dict) -> int:
    """Load the newest complete checkpoint in ``folder`` into ``engine``; return its step (0 if none).

    Model, optimizer and LR schedule come back through DeepSpeed, each rank's random generators
    from its own file; the data position is the step itself, since batches are a pure function of
    the step (``toolkit.data.batches``). A checkpoint saved under another sharding than the run's
    now (the last of ``run``'s ``layouts``) loads from its universal copy, which the launcher wrote
    before the workers started (``toolkit.checkpoints.universal``).
    """
    chosen = _agreed_checkpoint(engine, folder)
    if chosen is None:
        return 0
    source = universal_copy(chosen) if resharded(written_layout(chosen, run), run["layouts"][-1]) else chosen
    # DeepSpeed reads this flag only while loading; a rollback later in the run may load a native one
    engine._config.load_universal_checkpoint = source != chosen
    try:
        path, client_state = engine.load_checkpoint(str(source.parent), tag=source.name,
                                                    load_module_strict=not frozen_base(engine))
    finally:
        engine._config.load_universal_checkpoint = False
    step = int(client_state["step"])
    _load_rng_state(source)
    if dist.get_rank() == 0:
        log.warning("resumed from %s at step %d", path, step)
    return step


def _agreed_checkpoint(engine, folder: Path) -> Path | None:
    """The checkpoint every rank loads: the newest complete one, judged by the storage leaders.

    With node-local storage each node judges its own files, and the run continues from the
    oldest of their choices, which must then be complete on every node.

    Raises:
        UserError: node-local checkpoints with no step complete on every node.
    """
    leader = _storage_leader(engine)
    mine = newest_complete(folder) if leader else None
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (leader, None if mine is None else mine.name))
    judged = {choice for lead, choice in gathered if lead}
    if judged == {None}:
        return None
    if None in judged:
        raise UserError(f"only some nodes have a complete checkpoint in {folder}",
                        "resume on the nodes that wrote them, or start a new run")
    oldest = folder / min(judged)  # zero-padded step names sort as their steps
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, why_incomplete(oldest) if leader and len(judged) > 1 else None)
    if any(problems):
        raise UserError(f"checkpoint {oldest.name} is not complete on every node: {next(filter(None, problems))}",
                        "resume on the nodes that wrote it, or start a new run")
    return oldest


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

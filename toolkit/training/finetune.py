"""One rank's whole run: a planned run directory -> model + data -> DeepSpeed engine -> training
loop -> checkpoints -> ``final/``.

Two ways in. ``dstk train`` plans the run (``toolkit.plan.prepare``) and starts workers that each
call :func:`run_planned` with the run directory: ``recipe.yaml``, ``ds_config.json`` and ``run.json``
are their whole input. A script the ``deepspeed`` launcher starts (or plain ``python``, one rank)
calls :func:`finetune` with a recipe: rank 0 plans the run first, unless it is planned already.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import transformers
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from toolkit import quiet
from toolkit.checkpoints import store as checkpoint
from toolkit.checkpoints.consolidate import consolidate
from toolkit.data.batches import GlobalBatches
from toolkit.data.formats import encode_set
from toolkit.errors import ResultNotWritten, UserError
from toolkit.launching.launcher import free_port
from toolkit.launching.nodes import AGREED_ENV, data_problems
from toolkit.models.build import build_model
from toolkit.models.loading import load_tokenizer
from toolkit.models.lora import merge
from toolkit.plan.prepare import prepare
from toolkit.recipe import Recipe, load_recipe, with_values
from toolkit.rundir import RunDir
from toolkit.training.host_memory import keep_freed_memory, keep_zero_buffers
from toolkit.training.metrics import (
    MetricsLogger,
    model_state_mb,
    peak_rss_mb_per_rank,
    per_rank,
)
from toolkit.training.report import write_report
from toolkit.training.runtime import runtime
from toolkit.training.shm_collectives import route_through_shared_memory, usable_cores
from toolkit.training.trainer import PipelineTrainer, Trainer


@dataclass
class FinetuneResult:
    """What a run produced; the same on every rank."""

    output_dir: Path
    final_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # the logged training losses, in order
    eval_before: dict | None = None
    eval_after: dict | None = None
    # The live DeepSpeed engine, for a script that goes on using the trained model.
    engine: object = field(default=None, repr=False)


def finetune(recipe: Recipe | str | Path | None = None, overrides: list[str] | None = None) -> FinetuneResult:
    """Fine-tune the recipe's model on this rank; every rank of the job calls it.

    Without a launcher (a plain ``python script.py``), or with one that started a single rank, the
    run is one rank, whatever ``parallel.nproc`` says.

    Args:
        recipe: a validated :class:`Recipe`, a YAML path or built-in name (None: ``tiny``).
        overrides: dotted ``key=value`` overrides when ``recipe`` is not a Recipe object.

    Returns:
        A :class:`FinetuneResult`; ``final_dir`` holds the consolidated Hugging Face model.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and recipe.parallel.nproc != 1:  # no launcher, or one that started one rank
        print(f"dstk: one rank: training on it alone (parallel.nproc {recipe.parallel.nproc} -> 1)",
              file=sys.stderr, flush=True)
        recipe = with_values(recipe, {"parallel.nproc": 1})
    _join(recipe)
    run = _plan_everywhere(recipe)
    # as planned: a resume may have changed train.grad_accum to keep the checkpoint's global batch
    return _train(load_recipe(RunDir(Path(recipe.output_dir)).recipe), run)


def run_planned(run_dir: Path) -> FinetuneResult:
    """Train the run ``dstk train`` planned in ``run_dir``; every worker it starts calls this."""
    planned = RunDir(Path(run_dir))
    if not planned.run_json.is_file():
        raise UserError(f"{run_dir} holds no planned run (no run.json)", "start runs with `dstk train`")
    recipe = load_recipe(planned.recipe)
    _join(recipe)
    return _train(recipe, planned.read_run())


def _join(recipe: Recipe) -> None:
    """Set this process up as one rank of the recipe's job: threads, memory, logging, process group."""
    if "OMP_NUM_THREADS" not in os.environ:  # `dstk train` sets it; a hand-run launcher does not
        # every rank would otherwise start a thread per core, and they would all contend for them
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)  # torchrun, DeepSpeed
        torch.set_num_threads(max(1, usable_cores() // ranks_here))
    if torch.cuda.is_available():  # before the model loads: a quantized base lands on the current GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        keep_freed_memory()
    _quiet_libraries()
    _init_distributed(recipe)
    # A ZeRO-3 run earlier in this process stays registered with transformers until its engine is
    # garbage-collected, which ranks do at different times: rank 0's meta-device parameter count
    # in prepare() would then run under zero.Init, alone, and hang the job.
    unset_hf_deepspeed_config()
    if dist.get_world_size() != recipe.parallel.nproc:
        raise UserError(f"the recipe sets parallel.nproc={recipe.parallel.nproc} but "
                        f"{dist.get_world_size()} rank(s) were started",
                        f"launch with --num_gpus {recipe.parallel.nproc} or set parallel.nproc")


def _quiet_libraries() -> None:
    # DeepSpeed still calls collectives torch has renamed; the warning is not the user's to act on
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    # peft asks about gradient checkpointing under transformers' old name
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def _teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _init_distributed(recipe: Recipe) -> None:
    """Join the launcher's process group, or make a one-rank group when there is no launcher."""
    if dist.is_initialized():
        return
    interface = recipe.parallel.network_interface
    if interface:  # set here, not by the launcher: pdsh and MPI do not carry GLOO_* to other hosts
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    if "RANK" not in os.environ:  # a plain `python script.py`: one rank, no launcher
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    # DeepSpeed prints that its shared-memory op was built, at every start of every rank
    with contextlib.nullcontext() if quiet.verbose() else contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(verbose=False, timeout=timedelta(seconds=recipe.parallel.comm_timeout_s))
    # Without an orderly teardown before the interpreter exits, ZeRO-3 workers abort with
    # "terminate called without an active exception" (DeepSpeed 0.19.8, gloo). At exit rather
    # than at the end of finetune, so the returned engine stays usable and finetune can run again.
    atexit.register(_teardown)


def _plan_everywhere(recipe: Recipe) -> dict:
    """Rank 0 plans the run directory (or finds it planned for this recipe); every rank gets run.json."""
    outcome: list = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = ("ok", prepare(recipe))
        except Exception as err:  # every rank must learn of it, or the others wait forever
            outcome[0] = ("error", err)
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise value
    return value


def _check_same_data(run: dict) -> None:
    """Every other node checks it reads the data node 0 audited (a hostfile launch, or the
    launcher run by hand, has no check before this); every rank learns of a difference, or the
    others would wait forever."""
    mine = data_problems(run["data"]) if os.environ.get("LOCAL_RANK") == "0" and dist.get_rank() else []
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, mine)
    problems = [f"rank {rank}: {problem}" for rank, listed in enumerate(found) for problem in listed]
    if problems:
        raise UserError(f"the nodes do not see the same data ({'; '.join(problems)})",
                        "give every node the same data files, or put them on shared storage")


def _data_parallel_rank(engine, recipe: Recipe) -> int:
    """Which data-parallel share of each global batch this rank computes."""
    if recipe.parallel.pipeline_stages > 1:
        return engine.grid.data_parallel_id
    if recipe.parallel.tensor_parallel > 1:  # DeepSpeed made the groups when it applied AutoTP
        from deepspeed.utils import groups

        return groups.get_data_parallel_rank()
    return dist.get_rank()


def _train(recipe: Recipe, run: dict) -> FinetuneResult:
    """Train the planned run (``run`` is its run.json) on this rank, from model loading to ``final/``."""
    if recipe.parallel.nodes > 1 and AGREED_ENV not in os.environ:
        _check_same_data(run)
    on_cpu = not torch.cuda.is_available()
    # ZeRO-3 would gain little and pay resident memory for it (see the module)
    shm_collectives = route_through_shared_memory(enabled=on_cpu and recipe.parallel.zero_stage < 3)
    run_dir = RunDir(Path(recipe.output_dir))
    rank, t = dist.get_rank(), recipe.train
    ds_config = json.loads(run_dir.ds_config.read_text())
    torch.manual_seed(t.seed)
    model_path = run["model"]["path"]
    tokenizer = load_tokenizer(model_path, recipe.trust_remote_code)
    rss_before_model = peak_rss_mb_per_rank()  # what the model, its gradients and optimizer add to
    model, _zero3_handle = build_model(recipe, model_path, ds_config)

    def encoded(split: str, limit: int | None = None):
        return encode_set(run["data"][split]["path"], tokenizer, recipe.data, t.seq_len, limit=limit,
                          trust_remote_code=recipe.trust_remote_code)

    train = encoded("train", recipe.data.train_limit)
    evalset = encoded("eval", recipe.data.eval_limit) if "eval" in run["data"] else None
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                     if p.requires_grad], config=ds_config)
    kept_zero_buffers = on_cpu and keep_zero_buffers(engine.optimizer)
    if t.compile:
        engine.compile()
    params = run["parallel"]["parameters"]
    if rank == 0:
        print(f"dstk: training {params['trainable']:,} of {params['total']:,} parameters "
              f"({params['trainable'] / params['total']:.2%})", flush=True)
    pipeline = recipe.parallel.pipeline_stages > 1
    dp_rank = _data_parallel_rank(engine, recipe)
    batches = GlobalBatches(train, t.micro_batch_size, t.grad_accum, recipe.data_parallel, dp_rank, t.seed,
                            group_by_length=t.group_by_length and not t.packing)
    logger = MetricsLogger(run_dir.metrics, rank)
    common = dict(pad_id=tokenizer.pad_token_id, logger=logger, replicas=recipe.parallel.tensor_parallel)
    trainer = (PipelineTrainer(engine, batches, train, evalset, seq_len=t.seq_len, **common) if pipeline
               else Trainer(engine, batches, train, evalset, pack_to=t.seq_len if t.packing else None, **common))

    layout = checkpoint.layout_of(recipe)
    start = checkpoint.resume(engine, run_dir.checkpoints, run) if recipe.resume == "auto" else 0
    eval_before = trainer.evaluate() if evalset is not None and start == 0 else None
    if eval_before is not None:
        logger.log_eval(start, eval_before)
    if rank == 0:  # a resumed run keeps the first attempt's evaluation before training
        run_dir.write_run({**run_dir.read_run(), "status": "running", "runtime": runtime(engine),
                           **({"eval_before": vars(eval_before)} if eval_before is not None else {})})

    def save(step: int, metrics: dict) -> None:
        checkpoint.save(engine, run_dir.checkpoints, step, metrics, keep_last=t.keep_last, keep_best=t.keep_best,
                        layout=layout, layouts=run.get("layouts"))

    lines = trainer.fit(start, t, save=save, rollback=lambda: checkpoint.resume(engine, run_dir.checkpoints, run))
    eval_after = trainer.evaluate() if evalset is not None else None
    if eval_after is not None:
        lines.append(logger.log_eval(t.max_steps, eval_after))
    last_loss = next((line["loss"] for line in reversed(lines) if "loss" in line), None)
    _write_result(engine, tokenizer, run_dir, t.max_steps,
                  lambda: save(t.max_steps, {"loss": last_loss, "eval_loss": None if eval_after is None else eval_after.loss}))
    if recipe.lora.merge and rank == 0:
        tokenizer.save_pretrained(merge(run_dir.final, run_dir.final / "merged"))
    measured = {"peak_rss_mb_per_rank": peak_rss_mb_per_rank(), "rss_before_model_mb_per_rank": rss_before_model,
                "model_state_mb_per_rank": per_rank(model_state_mb(engine)), "shm_collectives": shm_collectives,
                "kept_zero_buffers": kept_zero_buffers,
                "threads_per_rank": [int(n) for n in per_rank(torch.get_num_threads(), digits=0)]}
    if not on_cpu:  # what the GPU held at most: tensors allocated, not the caching allocator's reserve
        measured["peak_gpu_mb_per_rank"] = per_rank(torch.cuda.max_memory_allocated() / 2**20)
    result = FinetuneResult(
        output_dir=run_dir.root, final_dir=run_dir.final, steps=t.max_steps,
        losses=[line["loss"] for line in lines if "loss" in line],
        eval_before=None if eval_before is None else vars(eval_before),
        eval_after=None if eval_after is None else vars(eval_after), engine=engine)
    if rank == 0:
        _record_result(run_dir, result, measured)
        try:
            write_report(run_dir)
        except Exception as err:  # the model and its lineage are saved; a report must not undo that
            print(f"dstk: the run finished but its report could not be written ({err!r})", file=sys.stderr)
    dist.barrier()
    return result


def _write_result(engine, tokenizer, run_dir: RunDir, step: int, save_last) -> None:
    """The last checkpoint, then ``final/``: if either fails, the other is still written where it can
    be, and the error says where the trained model is and how to get it (a collective call).

    Raises:
        ResultNotWritten: with run.json's status ``trained`` and the reason.
    """
    try:
        save_last()
    except Exception as err:
        # the trained weights are in memory only: final/ comes from there (a pipeline's comes from
        # its checkpoint, which is what failed)
        written = _try(lambda: consolidate(engine, tokenizer, run_dir.final, run_dir.checkpoints, step))
        problem = (f"the checkpoint of step {step} could not be saved ({_one_line(err)}); "
                   + ("final/ holds the trained model, written from memory" if written
                      else "writing final/ from memory failed too"))
        hint = ("resume is not possible from this step" if written else
                f"the last complete checkpoint is in {run_dir.checkpoints}: `dstk checkpoints convert "
                f"{run_dir.root}` makes a Hugging Face model of it")
        raise _not_written(run_dir, problem, hint) from err
    try:
        consolidate(engine, tokenizer, run_dir.final, run_dir.checkpoints, step)
    except Exception as err:
        raise _not_written(run_dir, f"training finished and the checkpoint of step {step} is saved, but writing "
                                    f"final/ failed ({_one_line(err)})",
                           f"make the Hugging Face model offline: dstk checkpoints convert {run_dir.root}") from err


def _try(write) -> bool:
    try:
        write()
        return True
    except Exception as err:
        print(f"dstk: {_one_line(err)}", file=sys.stderr)
        return False


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:300]


def _not_written(run_dir: RunDir, problem: str, hint: str) -> ResultNotWritten:
    if dist.get_rank() == 0:
        run_dir.write_run({**run_dir.read_run(), "status": "trained", "error": f"{problem} ({hint})"})
    return ResultNotWritten(problem, hint)


def _record_result(run_dir: RunDir, result: FinetuneResult, measured: dict) -> None:
    run = run_dir.read_run()
    run["status"] = "completed"
    run["result"] = {"steps": result.steps, "final_loss": result.losses[-1] if result.losses else None,
                     "eval_before": result.eval_before or run.get("eval_before"), "eval_after": result.eval_after,
                     "final": str(result.final_dir), **measured}
    lineage = {key: run[key] for key in ("recipe_sha256", "data", "audit", "model")}
    (run_dir.final / "dstk_lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
    run_dir.write_run(run)

"""``metrics.jsonl``, TensorBoard when installed, and the progress bar, all on rank 0.

Every logged line carries the fields PRODUCT.md names: ``step``, ``loss``, ``lr``, ``tokens``
(non-padding tokens of the step, all ranks), ``tokens_per_s`` (over the logging window),
``elapsed_s``, ``peak_rss_mb`` (largest rank) and ``comm_share`` (the share of the logged step
spent in communication, mean of the ranks; see ``toolkit.training.comms``). Eval lines carry ``eval_loss``.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _own_peak_rss_mb() -> torch.Tensor:
    return torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])  # KiB -> MiB


def for_collectives(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` where the process group's backend takes it: NCCL reduces GPU tensors only."""
    return tensor.to(torch.cuda.current_device()) if dist.get_backend() == "nccl" else tensor


def peak_rss_mb() -> float:
    """Largest resident memory of any rank so far, in MiB (a collective call)."""
    mine = for_collectives(_own_peak_rss_mb())
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return round(mine.item(), 1)


def per_rank(value: float, digits: int = 1) -> list[float]:
    """Every rank's ``value``, by rank, rounded to ``digits`` (a collective call)."""
    every = [for_collectives(torch.zeros(1, dtype=torch.float64)) for _ in range(dist.get_world_size())]
    dist.all_gather(every, for_collectives(torch.tensor([value], dtype=torch.float64)))
    return [round(t.item(), digits) for t in every]


def peak_rss_mb_per_rank() -> list[float]:
    """Each rank's largest resident memory so far, in MiB, by rank (a collective call)."""
    return per_rank(_own_peak_rss_mb().item())


# Objects of these packages are looked into for the tensors they hold; others (and modules,
# whose parameters are visited directly) are not, so the walk stays inside the model states.
_STATE_HOLDERS = ("deepspeed", "torch.optim", "bitsandbytes")


def model_state_mb(engine) -> float:
    """MiB of this rank's model states: every tensor its parameters and optimizer hold.

    Weights (ZeRO-3 partitions, bitsandbytes blocks and scales), gradients, optimizer moments
    and fp32 master copies, each storage counted once however many views share it. It is what
    the ZeRO paper's per-rank formulas predict; activations and buffers freed after a step are
    not included.
    """
    storages: dict[tuple, int] = {}
    visited: set[int] = set()

    def walk(obj, depth: int) -> None:
        if id(obj) in visited or depth > 8:
            return
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta":
                storage = obj.untyped_storage()
                storages[(obj.device.type, storage.data_ptr())] = storage.nbytes()
            for name in ("grad", "ds_tensor", "quant_state"):
                walk(getattr(obj, name, None), depth + 1)
            return
        if isinstance(obj, dict):
            items = [*obj.keys(), *obj.values()]  # an optimizer's state is keyed by parameter
        elif isinstance(obj, (list, tuple, set)):
            items = obj
        elif not isinstance(obj, torch.nn.Module) and type(obj).__module__.startswith(_STATE_HOLDERS):
            items = vars(obj).values() if hasattr(obj, "__dict__") else ()
        else:
            return
        for item in items:
            walk(item, depth + 1)

    for param in engine.module.parameters():
        walk(param, 0)
    walk(engine.optimizer, 0)
    return sum(storages.values()) / 2**20


class MetricsLogger:
    """Writes metrics on rank 0; every rank calls it so the collective parts stay in step."""

    def __init__(self, path: Path, rank: int):
        self.rank, self.path = rank, path
        self.start = time.perf_counter()
        self.progress = None
        self.tensorboard = None
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def _write(self, line: dict) -> dict:
        line["elapsed_s"] = round(time.perf_counter() - self.start, 3)
        line["peak_rss_mb"] = peak_rss_mb()
        if self.rank == 0:
            with self.path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(line) + "\n")
            if self.tensorboard is not None:
                for key, value in line.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self.tensorboard.add_scalar(key, value, line["step"])
            if self.progress is not None:
                shown = {k: line[k] for k in ("loss", "eval_loss", "eval_response_match") if k in line}
                self.progress.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)
        return line

    def log_step(self, *, step: int, loss: float, lr: float, tokens: int, tokens_per_s: float,
                 grad_norm: float | None = None, comm_share: float | None = None) -> dict:
        line = {"step": step, "loss": loss, "lr": lr, "tokens": tokens, "tokens_per_s": round(tokens_per_s, 1)}
        if grad_norm is not None:
            line["grad_norm"] = grad_norm
        if comm_share is not None:
            line["comm_share"] = comm_share
        return self._write(line)

    def log_event(self, *, step: int, event: str, **details) -> dict:
        """A line for something that happened to the run (a divergence, a rollback)."""
        if self.rank == 0:
            print(f"dstk: step {step}: {event} {details}", file=sys.stderr, flush=True)
        return self._write({"step": step, "event": event, **details})

    def log_eval(self, step: int, result) -> dict:
        return self._write({"step": step, "eval_loss": result.loss, "eval_response_match": result.response_match,
                            "eval_records": result.records})

    def open_progress(self, start: int, total: int) -> None:
        if self.rank == 0:
            from tqdm import tqdm

            self.progress = tqdm(total=total, initial=start, desc="train", unit="step",
                                 file=sys.stderr, dynamic_ncols=True, mininterval=1.0)

    def reset_progress(self, step: int) -> None:
        if self.progress is not None:
            self.progress.n = step
            self.progress.refresh()

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.tensorboard is not None:
            self.tensorboard.flush()

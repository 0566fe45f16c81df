"""``metrics.jsonl``, TensorBoard when installed, and the progress bar, all on rank 0.

Every logged line carries the fields PRODUCT.md names: ``step``, ``loss``, ``lr``, ``tokens``
(non-padding tokens of the step, all ranks), ``tokens_per_s`` (over the logging window),
``elapsed_s`` and ``peak_rss_mb`` (largest rank). Eval lines carry ``eval_loss``.
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


def peak_rss_mb() -> float:
    """Largest resident memory of any rank so far, in MiB (a collective call)."""
    mine = _own_peak_rss_mb()
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return round(mine.item(), 1)


def peak_rss_mb_per_rank() -> list[float]:
    """Each rank's largest resident memory so far, in MiB, by rank (a collective call)."""
    every = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(every, _own_peak_rss_mb())
    return [round(t.item(), 1) for t in every]


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
                shown = {k: line[k] for k in ("loss", "eval_loss", "eval_accuracy") if k in line}
                self.progress.set_postfix({k: f"{v:.4f}" for k, v in shown.items()}, refresh=False)
        return line

    def log_step(self, *, step: int, loss: float, lr: float, tokens: int, tokens_per_s: float) -> dict:
        return self._write({"step": step, "loss": loss, "lr": lr, "tokens": tokens,
                            "tokens_per_s": round(tokens_per_s, 1)})

    def log_eval(self, step: int, result) -> dict:
        return self._write({"step": step, "eval_loss": result.loss, "eval_accuracy": result.accuracy,
                            "eval_records": result.records})

    def open_progress(self, start: int, total: int) -> None:
        if self.rank == 0:
            from tqdm import tqdm

            self.progress = tqdm(total=total, initial=start, desc="train", unit="step",
                                 file=sys.stderr, dynamic_ncols=True, mininterval=1.0)

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        if self.tensorboard is not None:
            self.tensorboard.flush()

"""The training loop over a DeepSpeed engine: the same loop for every ZeRO stage and rank count.

Loss normalisation is defined once, here: the loss of a step is the mean over every loss-bearing
token of the whole global batch (all micro-batches, all ranks), not a mean of per-micro-batch
means, so it does not depend on how the batch is cut up. DeepSpeed divides each micro-batch loss
by ``grad_accum`` and averages gradients over data-parallel ranks; scaling each micro-batch's
token-sum by ``data_parallel x grad_accum / tokens_in_step`` makes the result exactly that mean.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from toolkit.data import IGNORE, EncodedSet, GlobalBatches, collate, eval_shards
from toolkit.metrics import MetricsLogger


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy of next-token prediction, and which positions count.

    Returns:
        ``(loss, mask)``, both (batch, seq-1): loss 0 where the label is ignored.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="none").view_as(targets)
    return loss, targets != IGNORE


@dataclass
class EvalResult:
    loss: float
    accuracy: float  # exact match: every target token (response and EOS) predicted greedily
    records: int


class Trainer:
    """Runs steps, evaluation and logging for one rank of a DeepSpeed engine."""

    def __init__(self, engine, batches: GlobalBatches, train: EncodedSet, evalset: EncodedSet | None,
                 pad_id: int, logger: MetricsLogger, eval_batch_size: int):
        self.engine, self.batches, self.train, self.evalset = engine, batches, train, evalset
        self.pad_id, self.logger, self.eval_batch_size = pad_id, logger, eval_batch_size
        self.dp = batches.dp
        self.gas = batches.gas

    def _forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = self.engine.device
        out = self.engine(input_ids=batch["input_ids"].to(device),
                          attention_mask=batch["attention_mask"].to(device), use_cache=False)
        labels = batch["labels"].to(device)
        loss, mask = token_losses(out.logits, labels)
        return loss, mask, out.logits[:, :-1].argmax(-1) == labels[:, 1:]

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step; returns this rank's share of the step loss (not yet reduced)."""
        self.engine.train()
        scale = self.dp * self.gas / max(1, self.batches.target_tokens(step))
        total = torch.zeros((), device=self.engine.device)
        for indices in self.batches.micro_batches(step):
            loss, _, _ = self._forward(collate(self.train, indices, self.pad_id))
            micro = loss.sum() * scale
            self.engine.backward(micro)
            self.engine.step()
            total += micro.detach() / self.gas
        return total

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """Token-mean loss and exact-match accuracy over the whole eval set, all ranks together."""
        self.engine.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # loss, target tokens, correct records, records
        for indices in eval_shards(len(self.evalset), self.eval_batch_size, self.dp, dist.get_rank()):
            real = torch.from_numpy(indices >= 0)
            batch = collate(self.evalset, indices.clip(min=0), self.pad_id)
            batch["labels"][~real] = IGNORE  # padding slots keep ranks in step but count for nothing
            loss, mask, hit = self._forward(batch)
            mask, hit = mask.cpu(), hit.cpu()
            has_target = mask.any(dim=1)
            correct = ((hit | ~mask).all(dim=1) & has_target).sum()
            sums += torch.tensor([loss.sum().item(), mask.sum().item(), correct.item(),
                                  has_target.sum().item()], dtype=torch.float64)
        dist.all_reduce(sums)
        loss_sum, tokens, correct, records = sums.tolist()
        return EvalResult(loss_sum / max(tokens, 1), correct / max(records, 1), int(records))

    def fit(self, start: int, max_steps: int, eval_steps: int, save_steps: int, log_steps: int,
            save) -> list[dict]:
        """Train from step ``start`` to ``max_steps``; ``save(step)`` is called at save points.

        Returns:
            The metrics lines written, eval lines included.
        """
        lines: list[dict] = []
        window_tokens, window_start = 0, time.perf_counter()
        self.logger.open_progress(start, max_steps)
        for step in range(start, max_steps):
            loss = self.train_step(step)
            window_tokens += self.batches.tokens(step)
            done = step + 1
            if done % log_steps == 0 or done == max_steps:
                dist.all_reduce(loss)
                elapsed = time.perf_counter() - window_start
                lines.append(self.logger.log_step(
                    step=done, loss=loss.item() / self.dp, lr=self.engine.get_lr()[0],
                    tokens=self.batches.tokens(step), tokens_per_s=window_tokens / elapsed))
                window_tokens, window_start = 0, time.perf_counter()
            self.logger.advance()
            if self.evalset is not None and eval_steps and done % eval_steps == 0 and done != max_steps:
                lines.append(self.logger.log_eval(done, self.evaluate()))
            if save_steps and done % save_steps == 0 and done != max_steps:
                save(done)
        self.logger.close_progress()
        return lines

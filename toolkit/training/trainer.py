"""The training loop over a DeepSpeed engine: the same loop for every ZeRO stage and rank count.

Loss normalisation is defined once, here: the loss of a step is the mean over every loss-bearing
token of the whole global batch (all micro-batches, all ranks), not a mean of per-micro-batch
means, so it does not depend on how the batch is cut up. DeepSpeed divides each micro-batch loss
by ``grad_accum`` and averages gradients over data-parallel ranks; scaling each micro-batch's
token-sum by ``data_parallel x grad_accum / tokens_in_step`` makes the result exactly that mean.

Two drivers share that definition: :class:`Trainer` runs an HF module micro-batch by micro-batch
(ZeRO 0-3, AutoTP), :class:`PipelineTrainer` hands whole steps to DeepSpeed's pipeline engine.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from toolkit.data.batches import EncodedSet, GlobalBatches, collate, eval_shards
from toolkit.data.packing import pack
from toolkit.loss import IGNORE, cross_entropy_sum, next_token_sum, scored
from toolkit.training.comms import CommClock
from toolkit.training.divergence import Diverged, DivergenceGuard
from toolkit.training.metrics import MetricsLogger, for_collectives, per_rank


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the Hugging Face model under ``model`` (a PEFT model's base) takes ``logits_to_keep``."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@dataclass
class EvalScore:
    """A held-out set scored during training, all ranks together."""

    loss: float  # the token mean of the next-token loss
    # the share of records whose whole response (and EOS) is the greedy prediction at every target
    # position: what greedy decoding would reproduce exactly (not only a final answer, as ``dstk eval``
    # compares)
    response_match: float
    records: int  # records with at least one target token left after truncation to seq_len
    truncated: int = 0  # records whose every target token was truncated away: not scored


# The model inputs' sizes that vary between packed micro-batches: tokens and rows (see
# toolkit.data.packing).
_PACKED_SIZES = {"input_ids": 1, "position_ids": 1, "token_slots": 0, "attention_mask": 0, "row_slots": 0,
                 "logits_to_keep": 0, "targets": 1}


class Trainer:
    """Runs steps, evaluation and logging for one rank of a DeepSpeed engine.

    Args:
        engine: the DeepSpeed engine.
        batches: this rank's view of the global batches (its data-parallel rank and size).
        train, evalset: the encoded sets.
        pad_id: the tokenizer's padding id.
        logger: metrics on rank 0.
        pack_to: share the records all data-parallel ranks run at one accumulation step out
            between the ranks by tokens and pack this rank's share into rows of this many tokens
            (None: pad each micro-batch); see ``toolkit.data.packing``. Evaluation always pads.
        replicas: ranks that compute each data-parallel share identically (the tensor-parallel
            degree); sums over all ranks are divided by it.
    """

    # Pad every micro-batch to this many tokens (None: to its longest record).
    pad_to: int | None = None

    def __init__(self, engine, batches: GlobalBatches, train: EncodedSet, evalset: EncodedSet | None,
                 pad_id: int, logger: MetricsLogger, replicas: int = 1, pack_to: int | None = None):
        self.engine, self.batches, self.train, self.evalset = engine, batches, train, evalset
        self.pad_id, self.logger, self.replicas, self.pack_to = pad_id, logger, replicas, pack_to
        # DeepSpeed reports the global gradient norm from its ZeRO and bf16 optimizers, not from
        # plain fp32 data parallelism, where every rank holds the whole averaged gradient after
        # backward: there it is taken by hand (a tensor, read only when a line is logged)
        self._norm_by_hand = (engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
                              and engine.autotp_size() <= 1)  # 0 when AutoTP is off
        self._own_norm = None
        self._norm_wanted = True  # fit() asks for it on the steps it logs only
        # with a compiled model the loss compiles too: fused, the logits' fp32 copy, log-softmax and
        # their gradient take a pass or two over the logits instead of several
        self._loss_sum = torch.compile(cross_entropy_sum) if engine.is_compiled else cross_entropy_sum
        # packed: the LM head and the loss on target positions only (a prompt's tokens predict
        # nothing), where the model takes transformers' logits_to_keep
        self._targets_only = pack_to is not None and takes_logits_to_keep(engine.module)
        self.comm_clock = CommClock()  # timed on the steps it logs only
        tp_check = getattr(engine, "first_dataloader_check", None)
        if pack_to is not None and tp_check is not None:
            # AutoTP checks on the first forward that the tensor-parallel ranks got the same batch,
            # but (DeepSpeed 0.19.8) compares a tuple of tensors with != and raises on packed_rows,
            # so a packed run crashed at its first step without an eval before it, and on every
            # resume. The ranks draw the same batches by construction (one data-parallel rank).
            tp_check.remove()

    def grad_norm(self) -> float | None:
        """The last step's global gradient norm before clipping (None where it is not known)."""
        norm = self._own_norm if self._norm_by_hand else self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def _collate(self, data: EncodedSet, indices) -> dict[str, torch.Tensor]:
        return collate(data, indices, self.pad_id, width=self.pad_to)

    def _train_batches(self, step: int):
        """This rank's micro-batches of ``step``, made one at a time."""
        if self.pack_to is None:
            for indices in self.batches.micro_batches(step):
                yield self._collate(self.train, indices)
            return
        dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        for records in self.batches.accumulation_steps(step):
            batch = pack(self.train, records, self.pack_to, dtype=dtype, share=(self.batches.rank, self.batches.dp))
            if not self._targets_only:
                del batch["logits_to_keep"], batch["targets"]
            for name, dim in _PACKED_SIZES.items():  # a compiled model: one graph for any tokens and rows
                if name in batch:
                    torch._dynamo.maybe_mark_dynamic(batch[name], dim)
            yield batch

    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Next-token logits of a micro-batch (None on ranks that do not compute them)."""
        device = self.engine.device
        extra = {"position_ids": batch["position_ids"].to(device)} if "position_ids" in batch else {}
        if "row_slots" in batch:  # packed: see toolkit.models.packed_attention
            extra["packed_rows"] = (batch["row_slots"].to(device), batch["token_slots"].to(device))
        if "logits_to_keep" in batch:
            extra["logits_to_keep"] = batch["logits_to_keep"].to(device)
        return self.engine(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device), use_cache=False, **extra).logits

    def _micro_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, device = self._logits(batch), self.engine.device
        if "targets" in batch:  # the logits of target positions only
            return self._loss_sum(logits, batch["targets"].to(device))
        return self._loss_sum(logits[:, :-1], batch["labels"][:, 1:].to(device))

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step; returns this rank's share of the step loss (see :meth:`step_loss`)."""
        self.engine.train()
        share = torch.zeros((), device=self.engine.device)
        tokens = max(1, self.batches.target_tokens(step))
        for batch in self._train_batches(step):
            micro = self._micro_loss_sum(batch) / tokens
            # DeepSpeed divides by grad_accum and averages over data-parallel ranks; undo both so
            # the gradient is that of the token mean over the whole global batch
            self.engine.backward(micro * self.batches.dp * self.batches.gas)
            if self._norm_by_hand and self._norm_wanted and self.engine.is_gradient_accumulation_boundary():
                self._own_norm = torch.linalg.vector_norm(torch.stack(
                    [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]))
            self.engine.step()
            share += micro.detach()
        return share

    def _comm_share(self, comm_s: float | None, step_s: float) -> float | None:
        """The mean over ranks of the share of the step spent communicating (a collective call)."""
        if comm_s is None:
            return None
        shares = per_rank(comm_s / step_s, digits=4)
        return round(sum(shares) / len(shares), 4)

    def step_loss(self, share: torch.Tensor) -> float:
        """The step loss from every rank's share (a collective call)."""
        dist.all_reduce(share)
        return share.item() / self.replicas

    @torch.no_grad()
    @torch.compiler.set_stance("force_eager")
    def evaluate(self) -> EvalScore:
        """Token-mean loss and response match over the whole eval set, all ranks together.

        A compiled model runs uncompiled here: every eval shape and the no-grad mode would each cost
        a compilation, for a pass that runs a few times per run.
        """
        self.engine.eval()
        sums = torch.zeros(5, dtype=torch.float64)  # loss, target tokens, correct records, scored, all records
        mbs = self.batches.mbs
        for indices in eval_shards(len(self.evalset), mbs, self.batches.dp, self.batches.rank):
            real = torch.from_numpy(indices >= 0)
            batch = self._collate(self.evalset, indices.clip(min=0))
            batch["labels"][~real] = IGNORE  # padding slots keep ranks in step but count for nothing
            logits = self._logits(batch)
            if logits is None:
                continue
            loss = next_token_sum(logits, batch["labels"])
            hit = logits[:, :-1].argmax(-1).cpu() == batch["labels"][:, 1:]
            mask = scored(batch["labels"])
            has_target = mask.any(dim=1)
            correct = ((hit | ~mask).all(dim=1) & has_target).sum()
            sums += torch.tensor([loss.item(), mask.sum().item(), correct.item(),
                                  has_target.sum().item(), real.sum().item()], dtype=torch.float64)
        sums = for_collectives(sums)
        dist.all_reduce(sums)
        loss_sum, tokens, correct, records, held_out = (sums / self.replicas).tolist()
        return EvalScore(loss_sum / max(tokens, 1), correct / max(records, 1), int(records), int(held_out - records))

    def fit(self, start: int, train, save, rollback) -> list[dict]:
        """Train from step ``start`` to ``train.max_steps`` (a recipe's ``train`` section).

        ``save(step, metrics)`` is called at checkpoint steps; ``rollback()`` reloads the last
        complete checkpoint and returns its step (0 if there is none), for the divergence guard.

        Returns:
            The metrics lines written, eval lines included.

        Raises:
            Diverged: the loss diverged and ``train.divergence`` says stop (or skips ran out).
        """
        policy = train.divergence
        guard = DivergenceGuard(policy.spike_factor, policy.window)
        lines: list[dict] = []
        skipped: set[int] = set()  # steps whose batches the guard dropped
        last_check, window_tokens, window_start = start, 0, time.perf_counter()
        self.logger.open_progress(start, train.max_steps)
        step = start
        while step < train.max_steps:
            done = step + 1
            if done in skipped:
                self.logger.advance()
                step = done
                continue
            checkpointing = bool(train.save_steps) and done % train.save_steps == 0 and done != train.max_steps
            synced = done % train.log_steps == 0 or done == train.max_steps or checkpointing
            self._norm_wanted = synced
            if synced:
                self.comm_clock.start()
                step_start = time.perf_counter()
            share = self.train_step(step)
            window_tokens += self.batches.tokens(step)
            if synced:
                loss = self.step_loss(share)  # the only host sync of a step, on logging steps
                comm_share = self._comm_share(self.comm_clock.stop(), time.perf_counter() - step_start)
                reason = guard.check(loss) if policy.action != "off" else None
                if reason is not None:
                    lines.append(self.logger.log_event(step=done, event="divergence", reason=reason, bad_loss=str(loss),
                                                       action=policy.action))
                    step = self._recover(done, reason, loss, policy, skipped, last_check, rollback, lines)
                    last_check, window_tokens, window_start = step, 0, time.perf_counter()
                    self.logger.reset_progress(step)
                    continue
                last_check = done
                elapsed = time.perf_counter() - window_start
                lines.append(self.logger.log_step(
                    step=done, loss=loss, lr=self.engine.get_lr()[0], tokens=self.batches.tokens(step),
                    tokens_per_s=window_tokens / elapsed, grad_norm=self.grad_norm(), comm_share=comm_share))
            self.logger.advance()
            metrics = {"loss": lines[-1]["loss"]} if checkpointing else {}
            if self.evalset is not None and train.eval_steps and done % train.eval_steps == 0 \
                    and done != train.max_steps:
                lines.append(self.logger.log_eval(done, result := self.evaluate()))
                metrics["eval_loss"] = result.loss
            if checkpointing:
                save(done, metrics)
            if synced:  # the next window times training only, not this step's evaluation or save
                window_tokens, window_start = 0, time.perf_counter()
            step = done
        self.logger.close_progress()
        return lines

    def _recover(self, done: int, reason: str, loss: float, policy, skipped: set[int], last_check: int,
                 rollback, lines: list[dict]) -> int:
        """Act on a divergence at step ``done``: raise (stop), or roll back and return the step to go on from."""
        why = f"the loss is {loss:.4g} at step {done} ({reason})"
        fix = "lower train.lr or raise train.divergence.spike_factor, then continue with resume=auto"
        if policy.action == "stop":
            raise Diverged(f"{why}; the run stopped, its latest checkpoint predates the divergence", fix)
        events = sum(1 for line in lines if line.get("event") == "divergence")
        if events > policy.max_skips:
            raise Diverged(f"{why}, divergence {events} after {policy.max_skips} skips; the run stopped", fix)
        resumed = rollback()  # the newest complete checkpoint: saved at a checked step, before this one
        if resumed == 0:
            raise Diverged(f"{why}, and there is no checkpoint to roll back to; the run stopped",
                           "set train.save_steps so that skip has a checkpoint to return to")
        skipped.update(range(last_check + 1, done + 1))
        lines.append(self.logger.log_event(step=done, event="rollback", to_step=resumed,
                                           skipped=sorted(range(last_check + 1, done + 1))))
        return resumed


class PipelineTrainer(Trainer):
    """The same steps through DeepSpeed's pipeline engine (``train_batch`` / ``eval_batch``).

    Micro-batches all have one shape, ``seq_len`` tokens: DeepSpeed sizes the buffers between
    stages from the first one.
    """

    def __init__(self, *args, seq_len: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad_to = seq_len

    def _item(self, batch: dict[str, torch.Tensor], scale: float):
        return (batch["input_ids"], batch["attention_mask"]), (batch["labels"], torch.tensor(scale))

    def train_step(self, step: int) -> torch.Tensor:
        self.engine.train()
        scale = self.batches.dp * self.batches.gas / max(1, self.batches.target_tokens(step))
        items = [self._item(self._collate(self.train, indices), scale)
                 for indices in self.batches.micro_batches(step)]
        # DeepSpeed averages the micro-batch losses and the data-parallel ranks and broadcasts
        # the result from the last stage: with this scale, that is already the step loss
        return self.engine.train_batch(iter(items))

    def step_loss(self, share: torch.Tensor) -> float:
        return share.item()

    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        _, logits = self.engine.eval_batch(iter([self._item(batch, 1.0)]), return_logits=True,
                                           num_micro_batches=1)
        return logits if self.engine.is_last_stage() else None

"""Packed records give every record the logits and loss it gets alone (1e-5), for each family:
the model computes them as one flat sequence of real tokens and attends in the packing's rows
under a block mask; position ids alone do not keep records apart."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from toolkit.data.batches import EncodedSet, collate
from toolkit.data.packing import pack, plan_rows
from toolkit.loss import IGNORE, cross_entropy_sum, next_token_sum
from toolkit.models import packed_attention
from toolkit.models.packed_attention import use_packed_attention
from toolkit.models.presets import preset_config
from toolkit.training.trainer import takes_logits_to_keep

LENGTHS = [9, 23, 5, 17, 12, 30, 3]


@pytest.fixture(scope="module")
def records():
    rng = np.random.default_rng(0)
    ids = [rng.integers(5, 90, n).tolist() for n in LENGTHS]
    labels = [[IGNORE] * (n // 3) + row[n // 3:] for n, row in zip(LENGTHS, ids)]  # a prompt, then targets
    return EncodedSet(ids, labels)


def _model(preset: str, attention: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(preset_config(preset), attn_implementation=attention).eval()


def test_rows_hold_every_record_once_within_the_width():
    rows = plan_rows(np.array(LENGTHS), 32)
    assert sorted(p for row in rows for p in row) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[p] for p in row) <= 32 for row in rows) and len(rows) == 4  # 99 tokens


@pytest.mark.parametrize("width", [32, 128])  # 128: every record fits one row
def test_ranks_share_the_records_of_one_step_by_tokens(records, width):
    """Each of 2 ranks packs its share of the records: every record exactly once, at least one row
    each, and tokens that differ by at most the longest record (here: 99 = 50 + 49)."""
    indices = np.arange(len(LENGTHS))
    shares = [pack(records, indices, width=width, share=(rank, 2)) for rank in range(2)]
    found = [record for share in shares for record in _records_in(share)]
    assert sorted(found) == sorted(map(tuple, records.input_ids))
    assert min(share["attention_mask"].shape[0] for share in shares) >= 1
    assert sorted(share["input_ids"].shape[1] for share in shares) == [49, 50]


def test_tokens_and_row_slots_map_onto_each_other(records):
    packed = pack(records, np.arange(len(LENGTHS)), width=32)
    tokens = packed["input_ids"].shape[1]
    assert tokens == sum(LENGTHS) and packed["row_slots"].shape == (4 * 32,)  # 4 rows, as planned
    assert torch.equal(packed["row_slots"][packed["token_slots"]], torch.arange(tokens))
    assert int((packed["row_slots"] == tokens).sum()) == 4 * 32 - tokens  # every other slot is padding


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gpt-neox", "tiny-phi"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_logits_and_loss_equal_each_record_alone(records, preset, attention, monkeypatch):
    """In the rows runs the family's eager attention on a CPU and sdpa on a GPU: both, here on the CPU,
    against the record alone under the same attention."""
    if attention == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        monkeypatch.setattr(packed_attention, "_own_attention", lambda module: sdpa_attention_forward)
    model = _model(preset, attention)
    packed = pack(records, np.arange(len(LENGTHS)), width=32)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in records.input_ids]
        use_packed_attention(model)
        logits = model(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                       position_ids=packed["position_ids"],
                       packed_rows=(packed["row_slots"], packed["token_slots"])).logits
        loss_sum = next_token_sum(logits, packed["labels"])
        alone_sum = 0.0
        for r, ids in enumerate(records.input_ids):
            start = _where(packed, ids)
            torch.testing.assert_close(logits[0, start:start + len(ids)], alone[r], rtol=1e-5, atol=1e-5)
            alone_sum += next_token_sum(alone[r][None], torch.tensor([records.labels[r]]))
    torch.testing.assert_close(loss_sum, alone_sum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-gpt2", "tiny-gpt-neox", "tiny-phi"])
def test_logits_of_targets_only_give_the_loss_and_gradient_of_all(records, preset):
    """Training packed, the LM head and the loss run on target positions only (a third of the
    tokens here are prompt): the same loss and gradient as from every position's logits."""
    model = _model(preset, "eager")
    use_packed_attention(model)
    assert takes_logits_to_keep(model)
    packed = pack(records, np.arange(len(LENGTHS)), width=32)
    inputs = {"input_ids": packed["input_ids"], "attention_mask": packed["attention_mask"],
              "position_ids": packed["position_ids"], "packed_rows": (packed["row_slots"], packed["token_slots"])}

    def loss_and_grad(loss):
        model.zero_grad()
        loss.backward()
        return loss.detach(), model.get_output_embeddings().weight.grad.clone()

    every = loss_and_grad(next_token_sum(model(**inputs).logits, packed["labels"]))
    kept_logits = model(**inputs, logits_to_keep=packed["logits_to_keep"]).logits
    targets = int((packed["labels"] != IGNORE).sum())
    assert kept_logits.shape[1] == packed["targets"].shape[1] == targets < sum(LENGTHS)
    kept = loss_and_grad(cross_entropy_sum(kept_logits, packed["targets"]))
    for mine, expected in zip(kept, every):
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-6)


def test_logits_of_every_position_where_the_model_cannot_keep_fewer():
    """The LM-head shortcut is taken through a LoRA model to its base, and not for a model whose
    forward has no ``logits_to_keep``."""
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(_model("tiny-llama", "eager"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert takes_logits_to_keep(adapted)

    class OwnHead(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, **kwargs):
            raise NotImplementedError

    assert not takes_logits_to_keep(OwnHead())


def test_a_packable_model_still_runs_padded_batches(records):
    """Evaluation feeds the same model padded batches: it attends as it did before packing."""
    model = _model("tiny-llama", "sdpa")
    padded = collate(records, np.arange(len(LENGTHS)), pad_id=0)
    inputs = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    with torch.no_grad():
        before = model(**inputs).logits
        use_packed_attention(model)
        after = model(**inputs).logits
    real = padded["attention_mask"].bool()
    torch.testing.assert_close(after[real], before[real], rtol=1e-5, atol=1e-5)


def test_position_ids_alone_leak_between_records(records):
    """Why the rows and their mask are there: without them a packed record sees the ones before it."""
    model = _model("tiny-llama", "sdpa")
    packed = pack(records, np.arange(len(LENGTHS)), width=32)
    with torch.no_grad():
        leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        ids = next(ids for ids in records.input_ids if _where(packed, ids) > 0)
        start = _where(packed, ids)
        alone = model(input_ids=torch.tensor([ids])).logits[0]
    assert (leaky[0, start:start + len(ids)] - alone).abs().max() > 1e-3


def test_packing_keeps_the_padded_batch_targets(records):
    indices = np.arange(len(LENGTHS))
    packed, padded = pack(records, indices, width=32), collate(records, indices, pad_id=0)
    assert int((packed["labels"][:, 1:] != IGNORE).sum()) == int((padded["labels"][:, 1:] != IGNORE).sum())
    assert packed["input_ids"].numel() < padded["input_ids"].numel()


def _records_in(packed) -> list[tuple]:
    """The records (token ids) of a packed batch: each starts where the position ids restart at 0."""
    ids, positions = packed["input_ids"][0].tolist(), packed["position_ids"][0].tolist()
    starts = [i for i, position in enumerate(positions) if position == 0] + [len(ids)]
    return [tuple(ids[a:b]) for a, b in zip(starts, starts[1:])]


def _where(packed, ids) -> int:
    """Where a record's tokens start in the packed sequence."""
    ids = torch.tensor(ids)
    for start in (packed["position_ids"][0] == 0).nonzero().flatten().tolist():
        if torch.equal(packed["input_ids"][0, start:start + len(ids)], ids):
            return start
    raise AssertionError("record not found")

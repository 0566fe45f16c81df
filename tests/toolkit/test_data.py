"""The data path: formats put the loss where it belongs; batches do not depend on the layout."""

import json

import numpy as np

from toolkit.data.batches import EncodedSet, GlobalBatches, eval_shards
from toolkit.data.builtin import generate
from toolkit.data.formats import encode
from toolkit.data.tokenizer import char_tokenizer
from toolkit.recipe import DataConfig

TOK = char_tokenizer()


def _targets(example):
    return TOK.decode([i for i, l in zip(example["input_ids"], example["labels"]) if l != -100])


def test_instruction_loss_is_on_the_response_and_eos_only():
    example = encode({"prompt": "reverse 12 =", "response": " 21"}, TOK, DataConfig(), 64)
    assert _targets(example) == " 21</s>"
    assert example["input_ids"][0] == TOK.bos_token_id


def test_chat_loss_is_on_assistant_turns_only():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "yo"}]
    example = encode({"messages": messages}, TOK, DataConfig(format="chat"), 256)
    assert _targets(example) == "hello</s>yo</s>"


def test_text_loss_is_on_every_token_and_truncation_holds():
    example = encode({"text": "abcdef"}, TOK, DataConfig(format="text"), 4)
    assert len(example["input_ids"]) == 4 and example["labels"] == example["input_ids"]


def test_one_rank_with_accumulation_sees_the_micro_batches_of_two_ranks():
    data = EncodedSet([[1] * (i % 7 + 2) for i in range(64)], [[1] * (i % 7 + 2) for i in range(64)])
    single = GlobalBatches(data, 4, 2, data_parallel=1, rank=0, seed=3)
    ranks = [GlobalBatches(data, 4, 1, data_parallel=2, rank=r, seed=3) for r in range(2)]
    for step in range(10):  # crosses an epoch boundary (8 steps per epoch)
        mine = [tuple(b) for b in single.micro_batches(step)]
        theirs = [tuple(r.micro_batches(step)[0]) for r in ranks]
        assert mine == theirs
        assert single.target_tokens(step) == ranks[0].target_tokens(step) == ranks[1].target_tokens(step)


def test_eval_shards_cover_every_record_once_with_equal_counts():
    shards = [eval_shards(10, 3, 2, rank) for rank in range(2)]
    assert len(shards[0]) == len(shards[1])
    seen = np.concatenate([b for rank in shards for b in rank])
    assert sorted(seen[seen >= 0].tolist()) == list(range(10))


def test_builtin_task_is_deterministic_and_splits_do_not_overlap(tmp_path):
    train = generate("reverse", "train", tmp_path / "a")
    again = generate("reverse", "train", tmp_path / "b")
    evaluation = generate("reverse", "eval", tmp_path / "a")
    assert train.read_bytes() == again.read_bytes()
    prompts = lambda path: [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
    train_prompts, eval_prompts = prompts(train), prompts(evaluation)
    assert len(set(train_prompts)) == len(train_prompts)
    assert not set(train_prompts) & set(eval_prompts)

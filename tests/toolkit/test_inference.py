"""Generation and evaluation on full and bitsandbytes-quantized model directories."""

from __future__ import annotations

import json

import pytest
import torch

from toolkit import inference
from toolkit.cli import main as cli_main
from toolkit.errors import UserError
from toolkit.exporting import quantize
from toolkit.inference import evaluate, generate
from toolkit.models.presets import build_preset

PROMPTS = ["a", "the quick brown fox", "hello, wor"]  # different lengths, so the batch is padded


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, inference.LoadedModel]:
    """Random-init tiny LLaMA and GPT-2 (tied embeddings), and the LLaMA quantized to nf4 on disk."""
    root = tmp_path_factory.mktemp("models")
    llama = build_preset("tiny-llama", root / "llama", seed=0)
    build_preset("tiny-gpt2", root / "gpt2", seed=0)
    config = quantize.bnb_config("nf4", double_quant=True, keep_fp=("lm_head",), compute_dtype="float32")
    quantize.save_quantized(inference.load(llama, quantization_config=config).model, root / "llama-nf4")
    inference.load(llama).tokenizer.save_pretrained(root / "llama-nf4")
    return {name: inference.load(root / name) for name in ("llama", "gpt2", "llama-nf4")}


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-nf4"])
def test_kv_cache_gives_the_same_greedy_tokens_as_recomputing(models, name):
    cached = generate(models[name], PROMPTS, max_new_tokens=12)
    uncached = generate(models[name], PROMPTS, max_new_tokens=12, use_cache=False)
    assert cached.token_ids == uncached.token_ids
    assert cached.new_tokens > 0


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-nf4"])
def test_left_padded_batch_gives_each_prompt_the_tokens_it_gets_alone(models, name):
    batch = generate(models[name], PROMPTS, max_new_tokens=12)
    alone = [generate(models[name], prompt, max_new_tokens=12).token_ids[0] for prompt in PROMPTS]
    assert batch.token_ids == alone


def test_stream_receives_the_generated_text_piece_by_piece(models):
    pieces: list[str] = []
    result = generate(models["llama"], "the quick", max_new_tokens=10, stream=pieces.append)
    assert "".join(pieces) == result.texts[0]


def test_sampling_repeats_with_a_seed_and_differs_from_greedy(models):
    def sample(seed):
        return generate(models["llama"], "the", max_new_tokens=16, do_sample=True, top_k=0, seed=seed).token_ids

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)


def test_text_records_are_scored_on_every_token_and_eos_like_transformers(models):
    loaded = models["llama"]
    text = "the quick brown fox jumps"
    ids = torch.tensor([loaded.tokenizer(text)["input_ids"] + [loaded.tokenizer.eos_token_id]])
    expected = loaded.model(input_ids=ids, labels=ids).loss.item()

    result = evaluate(loaded, [{"text": text}])

    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.tokens == ids.shape[1] - 1
    assert result.answer_match is None


def test_instruction_records_are_scored_on_response_tokens_only(models):
    loaded = models["llama"]
    prompt = loaded.tokenizer("question: ")["input_ids"]
    response = loaded.tokenizer("answer", add_special_tokens=False)["input_ids"] + [loaded.tokenizer.eos_token_id]
    ids = torch.tensor([prompt + response])
    labels = torch.tensor([[-100] * len(prompt) + response])
    expected = loaded.model(input_ids=ids, labels=labels).loss.item()

    result = evaluate(loaded, [{"prompt": "question: ", "response": "answer"}], answer_match=False)

    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.tokens == len(response)


def test_loss_does_not_depend_on_batching(models):
    rows = [{"text": "a b c"}, {"text": "a much longer line of text than the first"}, {"text": "xyz"}]
    one = evaluate(models["gpt2"], rows, batch_size=1, answer_match=False)
    three = evaluate(models["gpt2"], rows, batch_size=3, answer_match=False)
    assert three.loss == pytest.approx(one.loss, rel=1e-5)
    assert three.tokens == one.tokens


def test_answer_match_counts_answers_the_model_gives_and_stops_after(models, monkeypatch):
    loaded = models["llama"]
    greedy = generate(loaded, "the quick", max_new_tokens=12).token_ids[0]
    # Make the token the model emits after its first few tokens its EOS, so that it "answers" and stops.
    length = next(i for i in range(2, len(greedy)) if greedy[i] not in greedy[:i])
    monkeypatch.setattr(loaded.model.generation_config, "eos_token_id", greedy[length])
    answer = loaded.tokenizer.decode(greedy[:length])
    rows = [
        {"prompt": "the quick", "response": answer},
        {"prompt": "the quick", "response": f"some working\n#### {answer}"},  # GSM8K: the part after ####
        {"prompt": "the quick", "response": "#" * len(answer)},
    ]

    result = evaluate(loaded, rows)

    assert result.answered == 3
    assert result.answer_match == pytest.approx(2 / 3)


def test_quantized_directory_scores_close_to_its_source(models):
    rows = [{"text": "the quick brown fox jumps over the lazy dog"}]
    full = evaluate(models["llama"], rows)
    quantized = evaluate(models["llama-nf4"], rows)
    assert quantized.loss == pytest.approx(full.loss, rel=0.05)
    assert quantized.loss != full.loss


def test_chat_records_are_scored_on_assistant_turns_without_answer_match(models):
    def chat(user):
        return [{"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "hello"}]}]

    short, long = evaluate(models["llama"], chat("hi")), evaluate(models["llama"], chat("a much longer question"))
    assert short.tokens == long.tokens >= len("hello")  # the user turn is context, not scored
    assert short.answer_match is None


def test_eval_format_is_told_by_the_first_record_or_refused(models):
    assert inference.infer_fields([{"messages": []}]).format == "chat"
    assert inference.infer_fields([{"prompt": "p", "response": "r"}]).format == "instruction"
    assert inference.infer_fields([{"text": "t"}]).format == "text"
    with pytest.raises(UserError, match=r"first eval record has fields \['question'\]"):
        evaluate(models["llama"], [{"question": "no known field"}])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"stream": print}, "streaming needs exactly one prompt"),
        ({"do_sample": True, "temperature": 0.0}, "invalid sampling values"),
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
    ],
)
def test_bad_generation_arguments_are_user_errors(models, kwargs, message):
    with pytest.raises(UserError, match=message):
        generate(models["llama"], PROMPTS, **kwargs)


def test_cli_eval_and_generate_on_a_quantized_model(models, tmp_path, capsys):
    model_dir = str(models["llama-nf4"].model_dir)
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"text": "the quick brown fox"}) + "\n")

    assert cli_main(["eval", model_dir, "--data", str(data), "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)
    assert reported["loss"] == pytest.approx(evaluate(models["llama-nf4"], data).loss, rel=1e-6)

    assert cli_main(["generate", model_dir, "--prompt", "the", "--prompt", "a", "--max-new-tokens", "4"]) == 0
    expected = generate(models["llama-nf4"], ["the", "a"], max_new_tokens=4).texts
    assert capsys.readouterr().out == f"[0] the{expected[0]}\n[1] a{expected[1]}\n"


def test_cli_streams_a_single_prompt(models, capsys):
    assert cli_main(["generate", str(models["llama"].model_dir), "--prompt", "the", "--max-new-tokens", "5"]) == 0
    expected = generate(models["llama"], "the", max_new_tokens=5).texts[0]
    assert capsys.readouterr().out == expected + "\n"

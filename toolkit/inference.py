"""Generate text and evaluate loss, perplexity and answer match with a causal LM directory.

Works the same on full-precision and bitsandbytes-quantized (nf4, fp4, int8) model directories:
transformers reads the quantization from ``config.json``. Batched generation pads on the left so
that every prompt's last token sits at the end of its row, and keeps the KV cache on by default.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    TextStreamer,
)

from toolkit.data.batches import EncodedSet, collate
from toolkit.data.formats import encode
from toolkit.data.records import load_records
from toolkit.errors import UserError
from toolkit.loss import next_token_sum, scored
from toolkit.models.loading import check_causal_lm, check_weights, placement
from toolkit.recipe import DataConfig

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    """A model in eval mode and its tokenizer (``None`` when the directory ships none)."""

    model: PreTrainedModel
    tokenizer: object | None
    model_dir: Path


@dataclass
class Generation:
    """Output of :func:`generate`: per prompt the new text and token ids (up to the first EOS)."""

    texts: list[str]
    token_ids: list[list[int]]
    seconds: float

    @property
    def new_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class EvalResult:
    """Output of :func:`evaluate`.

    Attributes:
        loss: mean next-token cross-entropy (nats) over all scored tokens of the set.
        perplexity: ``exp(loss)``.
        tokens: number of scored tokens.
        examples: number of records evaluated.
        answer_match: fraction of instruction records whose generated (greedy) answer equals the
            response's: the text after the last ``####`` when there is one, as in GSM8K, else the
            whole response; ``None`` for other formats or when it was not asked for. (Training's
            ``response_match`` compares every response token under teacher forcing instead.)
        answered: number of records that answer match was computed on.
        seconds: wall time.
    """

    loss: float
    perplexity: float
    tokens: int
    examples: int
    answer_match: float | None
    answered: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def load(model_dir: str | Path, *, quantization_config=None, trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM directory in its stored dtype, on GPU 0 when there is one, else on CPU.

    Args:
        model_dir: a Hugging Face model directory (full precision or bitsandbytes-quantized).
        quantization_config: a ``BitsAndBytesConfig`` to quantize full-precision weights while loading.
        trust_remote_code: allow model code shipped inside the directory to run.

    Raises:
        UserError: the directory is missing or does not hold a causal LM.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: no such directory", "give a Hugging Face model directory")
    check_causal_lm(model_dir, trust_remote_code=trust_remote_code)
    check_weights(model_dir)
    options = placement()  # one device: verification must compare the same placement in every process
    if quantization_config is not None:
        # Only when given: transformers 5 treats an explicit None as "load unquantized", and a
        # quantized directory's weights would then no longer fit its own layers.
        options["quantization_config"] = quantization_config
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype="auto", trust_remote_code=trust_remote_code, use_safetensors=True, **options
    ).eval()
    tokenizer = None
    if has_tokenizer(model_dir):
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return LoadedModel(model, tokenizer, model_dir)


def has_tokenizer(model_dir: Path) -> bool:
    """Whether a model directory ships tokenizer files."""
    return any((model_dir / name).is_file() for name in _TOKENIZER_FILES)


def generate(
    model: str | Path | LoadedModel,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 50,
    seed: int = 0,
    stream: Callable[[str], None] | None = None,
    use_cache: bool = True,
    trust_remote_code: bool = False,
) -> Generation:
    """Continue each prompt; batched with left padding, greedy unless ``do_sample``.

    Args:
        model: a model directory or a :class:`LoadedModel`.
        prompts: one prompt or a list of prompts, generated as one batch.
        max_new_tokens: most tokens to add to each prompt.
        do_sample: sample instead of greedy decoding.
        temperature, top_p, top_k: sampling controls (used only with ``do_sample``).
        seed: torch seed set before generating, so sampled outputs repeat.
        stream: called with each piece of new text as it is decoded (one prompt only).
        use_cache: keep the KV cache (each step attends over cached keys instead of recomputing).
        trust_remote_code: see :func:`load`.

    Returns:
        A :class:`Generation` with the new text and token ids of each prompt and the time taken.

    Raises:
        UserError: no prompts, a stream with several prompts, an invalid sampling value, or a
            model directory without a tokenizer.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    _check_generate_args(prompts, max_new_tokens, do_sample, temperature, top_p, top_k, stream)
    loaded = model if isinstance(model, LoadedModel) else load(model, trust_remote_code=trust_remote_code)
    tokenizer = _require_tokenizer(loaded)
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(loaded.model.device)
    sampling = {"temperature": temperature, "top_p": top_p, "top_k": top_k} if do_sample else {}
    streamer = _CallbackStreamer(tokenizer, stream) if stream else None
    torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = loaded.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            use_cache=use_cache,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
            **sampling,
        )
    seconds = time.perf_counter() - start
    eos = _eos_ids(loaded)
    token_ids = [_until_eos(row, eos) for row in out[:, batch["input_ids"].shape[1] :].tolist()]
    texts = tokenizer.batch_decode(token_ids, skip_special_tokens=True)
    return Generation(texts, token_ids, seconds)


def evaluate(
    model: str | Path | LoadedModel,
    data: str | Path | Sequence[dict],
    *,
    fields: DataConfig | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    limit: int | None = None,
    answer_match: bool = True,
    trust_remote_code: bool = False,
) -> EvalResult:
    """Loss and perplexity over an eval set, and greedy answer match for instruction records.

    Records are encoded exactly as training encodes them (:func:`toolkit.data.encode`): text on
    every token, instruction on the response, chat on the assistant turns, each ending in EOS.

    Args:
        model: a model directory or a :class:`LoadedModel`.
        data: a data file or folder (anything :func:`toolkit.data.load_records` reads), or records.
        fields: format and field names, as the recipe's ``data`` section; default: the default
            field names, the format told by the first record (see :func:`infer_fields`).
        batch_size: records per forward pass.
        max_length: tokens kept per record (default: the model's context length).
        limit: evaluate only the first ``limit`` records.
        answer_match: also generate an answer for each instruction record and compare.
        trust_remote_code: see :func:`load`.

    Raises:
        UserError: unreadable data, records without the fields, or no tokens to score.
    """
    start = time.perf_counter()
    records = list(load_records(str(data)) if isinstance(data, (str, Path)) else data)[:limit]
    fields = fields or infer_fields(records)
    loaded = model if isinstance(model, LoadedModel) else load(model, trust_remote_code=trust_remote_code)
    tokenizer = _require_tokenizer(loaded)
    encoded = _encode(records, tokenizer, fields, max_length or _context_length(loaded.model))
    nll, tokens = 0.0, 0
    for first in range(0, len(encoded), batch_size):
        indices = np.arange(first, min(first + batch_size, len(encoded)))
        batch_nll, batch_tokens = token_nll(loaded.model, collate(encoded, indices, tokenizer.pad_token_id))
        nll, tokens = nll + batch_nll, tokens + batch_tokens
    if tokens == 0:
        raise UserError("the eval set has no tokens to score", "give records with text, or non-empty responses")
    answered = records if answer_match and fields.format == "instruction" else []
    matched = _answer_match(loaded, answered, fields, batch_size) if answered else None
    loss = nll / tokens
    return EvalResult(loss, math.exp(loss), tokens, len(records), matched, len(answered), time.perf_counter() - start)


def infer_fields(records: Sequence[dict], fields: DataConfig | None = None) -> DataConfig:
    """``fields`` (default field names if None) with the format its first record has fields for.

    Raises:
        UserError: no records, or a first record with none of the named fields.
    """
    fields = fields or DataConfig()
    if not records:
        raise UserError("the eval set has no records", "give a file with at least one record")
    keys = set(records[0])
    for format_name, needed in (
        ("chat", {fields.messages_field}),
        ("instruction", {fields.prompt_field, fields.response_field}),
        ("text", {fields.text_field}),
    ):
        if needed <= keys:
            return fields.model_copy(update={"format": format_name})
    raise UserError(
        f"the first eval record has fields {sorted(keys)}, none of {fields.text_field!r}, "
        f"{fields.prompt_field!r}+{fields.response_field!r} or {fields.messages_field!r}",
        "name its fields with --text-field, --prompt-field/--response-field or --messages-field",
    )


def token_nll(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of a batch and the number of tokens it covers.

    Args:
        model: a causal LM.
        batch: ``input_ids``, ``attention_mask`` and ``labels``, each (batch, seq).

    Returns:
        The summed NLL in nats and the number of scored tokens; their ratio is the mean loss.
    """
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"].to(model.device),
                       attention_mask=batch["attention_mask"].to(model.device)).logits
    return next_token_sum(logits, batch["labels"]).item(), int(scored(batch["labels"]).sum())


def _encode(records: Sequence[dict], tokenizer, fields: DataConfig, max_length: int) -> EncodedSet:
    ids, labels = [], []
    for index, record in enumerate(records):
        try:
            example = encode(record, tokenizer, fields, max_length)
        except KeyError as err:
            raise UserError(
                f"eval record {index} has no field {err} (format {fields.format})",
                "name the fields with --format and the --*-field flags",
            ) from None
        ids.append(example["input_ids"])
        labels.append(example["labels"])
    return EncodedSet(ids, labels)


def _answer_match(loaded: LoadedModel, records: Sequence[dict], fields: DataConfig, batch_size: int) -> float:
    tokenizer = loaded.tokenizer
    references = [record[fields.response_field] for record in records]
    # One token more than the longest reference: room for the EOS that ends a complete answer.
    budget = max(len(tokenizer(ref, add_special_tokens=False)["input_ids"]) for ref in references) + 1
    hits = 0
    for first in range(0, len(records), batch_size):
        prompts = [record[fields.prompt_field] for record in records[first : first + batch_size]]
        texts = generate(loaded, prompts, max_new_tokens=budget).texts
        hits += sum(_final_answer(text) == _final_answer(ref) for text, ref in zip(texts, references[first:]))
    return hits / len(records)


def _final_answer(text: str) -> str:
    """The part of an answer compared by answer match: after the last ``####`` if any, whitespace-normalized."""
    return re.sub(r"\s+", " ", text.rsplit("####", 1)[-1]).strip()


def _check_generate_args(prompts, max_new_tokens, do_sample, temperature, top_p, top_k, stream) -> None:
    if not prompts:
        raise UserError("no prompts given", "pass at least one --prompt")
    if stream is not None and len(prompts) != 1:
        raise UserError(f"streaming needs exactly one prompt, got {len(prompts)}", "drop --stream or pass one --prompt")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
        raise UserError(
            f"invalid sampling values temperature={temperature}, top_p={top_p}, top_k={top_k}",
            "use temperature > 0, 0 < top_p <= 1, top_k >= 0 (0 disables top-k)",
        )


def _require_tokenizer(loaded: LoadedModel):
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        raise UserError(f"{loaded.model_dir}: no tokenizer files", "save the tokenizer beside the model (tokenizer.save_pretrained)")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise UserError(f"{loaded.model_dir}: the tokenizer has neither a pad nor an EOS token", "set pad_token in tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token  # padded positions are masked, so any id will do
    return tokenizer


def _eos_ids(loaded: LoadedModel) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    if eos is None and loaded.tokenizer is not None:
        eos = loaded.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos} - {None}


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in eos:
            return ids[:i]
    return ids


def _context_length(model: PreTrainedModel) -> int:
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048


class _CallbackStreamer(TextStreamer):
    """A TextStreamer that hands each decoded piece of new text to a callback instead of printing."""

    def __init__(self, tokenizer, callback: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._callback = callback

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self._callback(text)

"""A starter recipe for a model, a data file and this machine (``dstk init``).

It is the built-in recipe of the task (``toolkit/recipes/{sft,chat,lora,qlora}.yaml``, commented)
with the model, the data's format and fields, the parallel layout and the step count filled in,
each changed line saying why. The fields are found as the audit finds them, from the first record;
the layout from the model's size and the accelerators at hand.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from toolkit.data.records import load_records
from toolkit.errors import UserError
from toolkit.models.loading import empty_model, resolve_model
from toolkit.plan.layout import model_config
from toolkit.recipe import builtin_path, load_recipe

TASKS = ("sft", "chat", "lora", "qlora")
# field names data sets use, most common first
_PAIRS = (("prompt", "response"), ("question", "answer"), ("instruction", "output"), ("input", "output"),
          ("prompt", "completion"), ("query", "response"))
_MESSAGES = ("messages", "conversations", "conversation")
_TEXTS = ("text", "content")
# what fits a rank: this share of its memory for weights, gradients and optimizer states
_USABLE = 0.6


@dataclass(frozen=True)
class Machine:
    """What the recipe is laid out for."""

    gpus: int
    gpu_memory: int  # bytes of the smallest GPU (0 without one)
    bf16: bool  # whether the GPUs compute in bf16
    cores: int

    @classmethod
    def here(cls) -> Machine:
        import torch

        from toolkit.training.shm_collectives import usable_cores

        gpus = torch.cuda.device_count()
        memory = min((torch.cuda.get_device_properties(i).total_memory for i in range(gpus)), default=0)
        return cls(gpus, memory, gpus > 0 and torch.cuda.is_bf16_supported(), usable_cores())


@dataclass(frozen=True)
class Choice:
    key: str  # dotted recipe key
    value: object
    reason: str


def data_fields(columns: list[str], task: str | None) -> list[Choice]:
    """The data format and fields of a set with these columns (the ``chat`` task needs messages).

    Raises:
        UserError: no known field names; says which fields the data has and which keys to set.
    """
    messages = next((c for c in _MESSAGES if c in columns), None)
    if messages:
        return [Choice("data.format", "chat", f"the records hold {messages!r}"),
                Choice("data.messages_field", messages, "the list of {role, content} messages")]
    pair = next((p for p in _PAIRS if set(p) <= set(columns)), None)
    if pair and task != "chat":
        return [Choice("data.format", "instruction", f"the records hold {pair[0]!r} and {pair[1]!r}"),
                Choice("data.prompt_field", pair[0], "what the model reads"),
                Choice("data.response_field", pair[1], "what it learns to answer (the loss is on it only)")]
    text = next((c for c in _TEXTS if c in columns), None)
    if text and task != "chat":
        return [Choice("data.format", "text", f"the records hold {text!r} only"),
                Choice("data.text_field", text, "the loss is on every token")]
    raise UserError(f"cannot tell the data's format from its fields ({', '.join(columns)})",
                    "edit the recipe's data.format and data.*_field keys by hand, e.g. data.prompt_field=FIELD")


def layout(parameters: int, adapters: bool, machine: Machine) -> list[Choice]:
    """Ranks, ZeRO stage and precision for a model of ``parameters`` on ``machine``."""
    if machine.gpus:
        ranks = machine.gpus
        precision = Choice("train.precision", "bf16" if machine.bf16 else "fp32",
                           "these GPUs compute in bf16" if machine.bf16 else "these GPUs have no bf16")
    else:
        ranks = min(2, machine.cores)
        precision = Choice("train.precision", "fp32", "a CPU: fp32 is exact; bf16 pays only on CPUs with bf16 units")
    nproc = Choice("parallel.nproc", ranks, f"{machine.gpus} GPU(s)" if machine.gpus else f"{machine.cores} CPU core(s)")
    # per parameter: 2 bytes of bf16 weights; training every weight adds 14 bytes of gradients,
    # fp32 master copy and Adam moments, which ZeRO-2 shares out over the ranks
    trained = 0 if adapters else 14
    per_rank = parameters * (2 + trained / ranks)
    if not machine.gpus or per_rank <= _USABLE * machine.gpu_memory:
        stage = Choice("parallel.zero_stage", 2, f"~{_size(per_rank)} of model states per rank with ZeRO-2"
                       + (" fits a GPU" if machine.gpus else ""))
    else:
        stage = Choice("parallel.zero_stage", 3, f"~{_size(per_rank)} per rank with ZeRO-2 is more than "
                       f"{_USABLE:.0%} of a {_size(machine.gpu_memory)} GPU: ZeRO-3 shares the weights out too")
    return [nproc, stage, precision]


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def starter(model: str, train: str, evaluation: str | None, task: str | None, name: str,
            machine: Machine | None = None) -> tuple[str, list[Choice]]:
    """The starter recipe's YAML text and the choices made in it.

    Raises:
        UserError: an unknown task, an unreadable data file, or a model that cannot be resolved.
    """
    if task is not None and task not in TASKS:
        raise UserError(f"unknown task {task!r}", f"choose one of {', '.join(TASKS)}")
    records = load_records(train)
    fields = data_fields(list(records.column_names), task)
    task = task or ("chat" if fields[0].value == "chat" else "sft")
    source = resolve_model(model)
    probe = load_recipe(task, [f"model={model}"])
    config = model_config(probe, source)
    parameters = sum(p.numel() for p in empty_model(config).parameters())
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    machine = machine or Machine.here()
    choices = [Choice("name", name, "the run's name"), Choice("output_dir", f"runs/{name}", "where the run is written"),
               Choice("model", model, f"{parameters / 1e6:,.1f}M parameters"),
               Choice("data.train", train, f"{len(records):,} records"),
               Choice("data.eval", evaluation, "held out" if evaluation else "no eval set given"), *fields,
               *layout(parameters, task in ("lora", "qlora"), machine)]
    if context and context < probe.train.seq_len:
        choices.append(Choice("train.seq_len", context, "the model's context length"))
    recipe = load_recipe(task, [f"{c.key}={_scalar(c.value)}" for c in choices])
    per_step = recipe.train.micro_batch_size * recipe.train.grad_accum * recipe.data_parallel
    steps = max(10, math.ceil(len(records) / per_step))
    choices.append(Choice("train.max_steps", steps, f"one pass over the {len(records):,} records, "
                                                     f"{per_step} a step"))
    text = builtin_path(task).read_text()
    dropped = {"data.prompt_field", "data.response_field", "data.messages_field", "data.text_field"}
    for key in dropped - {c.key for c in choices}:
        text = _set(text, key, None, "")
    for choice in choices:
        text = _set(text, choice.key, choice.value, choice.reason)
    text = re.sub(r"^# Run it: .*$", f"# Run it:   dstk train {name}.yaml", text, flags=re.M)
    return text, choices


def write_starter(out: Path, text: str) -> None:
    """Write the recipe, after checking that it loads as written (nothing is written otherwise)."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        check = Path(scratch) / out.name
        check.write_text(text)
        load_recipe(check)
    out.write_text(text)


def _scalar(value) -> str:
    return "null" if value is None else str(value)


def _set(text: str, key: str, value, reason: str) -> str:
    """``text`` (a recipe in block style, two-space sections) with ``key`` set to ``value`` and the
    reason as its comment; None removes the key's line."""
    section, _, leaf = key.rpartition(".")
    lines = text.split("\n")
    indent = "  " if section else ""
    start, end = 0, len(lines)
    if section:
        start = next(i for i, line in enumerate(lines) if line == f"{section}:") + 1
        end = next((i for i in range(start, len(lines)) if lines[i] and not lines[i].startswith(" ")), len(lines))
        while end > start and not lines[end - 1].strip():
            end -= 1
    at = next((i for i in range(start, end) if lines[i].startswith(f"{indent}{leaf}:")), None)
    if value is None and not reason:  # a key to drop (another format's field)
        if at is not None:
            del lines[at]
        return "\n".join(lines)
    rendered = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    line = f"{indent}{leaf}: {rendered}"
    if reason:
        line = f"{line:<29} # {reason}"
    if at is None:
        lines.insert(end, line)
    else:
        lines[at] = line
    return "\n".join(lines)

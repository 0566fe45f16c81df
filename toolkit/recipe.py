"""Recipes: the schema of a run, loading YAML, dotted overrides and cross-field rules.

A recipe is data. Every key is documented once, here, in its ``Field(description=...)``; the README's
key table is generated from this schema (``python -m toolkit.recipe --markdown``). The order of
precedence is: schema default < recipe file < command-line ``key=value`` override.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import sys
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from data_checks import AuditPolicy
from data_checks.pii import find
from toolkit.errors import UserError

BUILTIN_PREFIX = "builtin:"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    train: str = Field(
        f"{BUILTIN_PREFIX}reverse",
        description="Training data: a JSONL/JSON/CSV/Parquet file or folder, a hub id, or "
        "`builtin:NAME` for a data set the project generates (`builtin:reverse`).",
    )
    eval: str | None = Field(
        f"{BUILTIN_PREFIX}reverse",
        description="Eval data, same forms as `data.train`; null for no evaluation. A built-in "
        "name gives that task's held-out split.",
    )
    format: Literal["text", "instruction", "chat"] = Field(
        "instruction",
        description="`text`: loss on every token; `instruction`: prompt + response, loss on the "
        "response only; `chat`: messages through the tokenizer's chat template, loss on "
        "assistant turns only.",
    )
    text_field: str = Field("text", description="Field holding the text (format `text`).")
    prompt_field: str = Field("prompt", description="Field holding the prompt (format `instruction`).")
    response_field: str = Field(
        "response", description="Field holding the response (format `instruction`)."
    )
    messages_field: str = Field(
        "messages", description="Field holding the list of {role, content} messages (format `chat`)."
    )
    train_limit: int | None = Field(
        None, ge=1,
        description="Train on the first this many records only (null: all of them), for quick trials; "
        "the audit still reads the whole file.",
    )
    eval_limit: int | None = Field(
        None, ge=1, description="Use at most this many eval records (null: all of them)."
    )


class ParallelConfig(_Strict):
    nproc: int = Field(
        2, ge=1, description="Ranks (processes) in the whole job; 2 on a 2-core CPU machine. `auto`: one "
        "per accelerator of this host (on a CPU, per core this process may use) times parallel.nodes, "
        "and parallel.elastic on: a restart takes the ranks it is given.",
    )
    elastic: bool = Field(
        False,
        description="On resume with another number of data-parallel ranks, keep the checkpoint's global "
        "batch by changing train.grad_accum (else such a resume is refused); set by nproc=auto.",
    )

    @model_validator(mode="before")
    @classmethod
    def _auto_nproc(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("nproc") == "auto":
            nodes = data.get("nodes", 1)
            per_node = available_ranks()
            data = {**data, "nproc": per_node * nodes if isinstance(nodes, int) else per_node, "elastic": True}
        return data
    zero_stage: int = Field(
        2, ge=0, le=3,
        description="ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 also "
        "gradients, 3 also parameters (the model is created partitioned).",
    )
    offload: Literal["none", "cpu"] = Field(
        "none",
        description="`cpu` moves optimizer state (and with ZeRO-3 the parameters) to host memory: "
        "slower steps, far less accelerator memory. Needs zero_stage 2 or 3.",
    )
    pipeline_stages: int = Field(
        1, ge=1,
        description="Pipeline stages the model is split into; nproc / stages ranks hold each stage "
        "(data parallel). With ZeRO 0 or 1 only.",
    )
    pipeline_partition: str = Field(
        "parameters",
        description="How layers are split over stages: `parameters` (balanced counts), `uniform` "
        "(balanced layer counts) or `type:REGEX` (balance the layers whose name matches).",
    )
    activation_checkpoint_interval: int = Field(
        0, ge=0, description="Pipelines: recompute activations in chunks of this many layers (0: off)."
    )
    tensor_parallel: int = Field(
        1, ge=1,
        description="Tensor-parallel degree (DeepSpeed AutoTP): each layer's weights are split over "
        "this many ranks. With ZeRO 0-2; not inside a pipeline.",
    )
    ds_config: str | None = Field(
        None,
        description="A DeepSpeed JSON config to start from instead of the built-in template for "
        "the ZeRO stage; its `\"auto\"` values are filled from this recipe.",
    )
    master_port: int | None = Field(
        None, ge=1024, le=65535,
        description="Rendezvous port on the master; null picks a free one on one node, 29500 on several. "
        "With one launcher per node, dstk's pre-launch check also uses the port after it.",
    )
    nodes: int = Field(
        1, ge=1,
        description="Hosts the job spans; parallel.nproc ranks are split evenly over them. With more than "
        "one, start `dstk train --node-rank N` on each host, or give a hostfile.",
    )
    hostfile: str | None = Field(
        None,
        description="A DeepSpeed hostfile (lines `HOST slots=N`): dstk on the first host starts every "
        "node through parallel.launcher. output_dir must be on storage every node sees.",
    )
    launcher: Literal["pdsh", "openmpi", "mvapich", "mpich", "impi", "slurm"] = Field(
        "pdsh", description="DeepSpeed's multi-node backend for a hostfile (ssh through pdsh by default)."
    )
    master_addr: str | None = Field(
        None,
        description="Address of node 0 that every node can reach; needed with parallel.nodes > 1 "
        "(the first hostfile host when a hostfile is given).",
    )
    network_interface: str | None = Field(
        None,
        description="Network interface(s) for collectives (GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME); "
        "null lets gloo/NCCL choose. A host's own environment variable wins over it.",
    )
    comm_timeout_s: int = Field(
        1800, ge=10,
        description="Seconds a collective (or a node waiting for the others) may block before the run "
        "fails; a host that vanishes without closing its connections is noticed after this.",
    )
    node_local_storage: bool = Field(
        False,
        description="output_dir is local to each node: every node writes its own ranks' checkpoint "
        "shards, and node 0 the consolidated model. Needs one launcher per node (--node-rank).",
    )


class DivergenceConfig(_Strict):
    action: Literal["stop", "skip", "off"] = Field(
        "stop",
        description="On a NaN/inf loss or a spike: `stop` the run (its `latest` checkpoint predates the "
        "divergence; resume from it after a fix), `skip` (reload the last complete checkpoint in place, "
        "drop the batches since the last good check and go on), or `off`. Checked on every step whose loss is "
        "synced: logging steps (`train.log_steps`) and checkpoint steps.",
    )
    spike_factor: float = Field(
        0.0, ge=0,
        description="Also treat a loss above this many times the median of the last `window` checked "
        "losses as a divergence (0: NaN/inf only).",
    )
    window: int = Field(10, ge=1, description="Checked losses the spike median is taken over.")
    max_skips: int = Field(3, ge=1, description="With `skip`: stop after this many divergences.")


class TrainConfig(_Strict):
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to run.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per rank per forward pass.")
    grad_accum: int = Field(
        1, ge=1, description="Micro-batches per optimizer step (with pipelines: micro-batches in flight)."
    )
    seq_len: int = Field(512, ge=8, description="Longest sequence in tokens; longer records are truncated.")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Learning rate at the last step, as a fraction of `lr`."
    )
    warmup_ratio: float = Field(
        0.05, ge=0, lt=1, description="Fraction of `max_steps` spent warming up linearly from 0 to `lr`."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables.")
    seed: int = Field(1234, description="Seed for initialisation, data order and dropout.")
    packing: bool = Field(
        False,
        description="Share the records all ranks run at one accumulation step out between the ranks by "
        "tokens and pack each share into rows of `seq_len` tokens instead of padding each micro-batch, each "
        "record attending only to itself (block-diagonal mask, its own position ids), and run every layer but "
        "attention on real tokens only: the same records and loss per step, without the padding. Not with "
        "pipeline stages.",
    )
    group_by_length: bool = Field(
        True,
        description="Without packing, cut each step's records into micro-batches of similar length, "
        "so less padding is computed (the step's records and loss do not change).",
    )
    compile: bool = Field(
        False,
        description="Compile the model with torch.compile (inductor), which fuses the elementwise work "
        "between its matmuls; the first steps pay the compilation (tens of seconds, cached for later "
        "runs), evaluation runs uncompiled. Without an accelerator the model then uses eager attention, "
        "which compiles into faster CPU code than sdpa's kernel. ZeRO 0-2 only, not with pipeline stages "
        "or tensor_parallel. Compiled dropout draws other random masks than eager dropout.",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="`bf16` mixed precision (fp32 master weights) or plain `fp32`."
    )
    save_steps: int = Field(
        0, ge=0, description="Save a DeepSpeed checkpoint every N steps (0: only at the end)."
    )
    eval_steps: int = Field(0, ge=0, description="Evaluate every N steps (0: only before and after).")
    log_steps: int = Field(10, ge=1, description="Write a metrics line (and sync the loss) every N steps.")
    keep_last: int = Field(
        0, ge=0, description="Keep only the newest N checkpoints (0: keep every one); `latest` is always kept."
    )
    keep_best: int = Field(
        0, ge=0,
        description="Also keep the N checkpoints with the lowest eval loss (needs `data.eval` and "
        "`train.save_steps` a multiple of `train.eval_steps`).",
    )
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)


class LoraConfig(_Strict):
    enabled: bool = Field(
        False, description="Train LoRA adapters (peft) instead of every weight; the base stays frozen."
    )
    r: int = Field(8, ge=1, description="Rank of each adapter's update.")
    alpha: float = Field(16.0, gt=0, description="Scale of the update: it is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on each adapter's input.")
    target_modules: list[str] | str | None = Field(
        None,
        description="Modules that get adapters: a list of names (`[q_proj, v_proj]`), `all-linear`, "
        "or a regex over full module names; null: peft's default for the model's family (LLaMA: "
        "q_proj, v_proj; GPT-2: c_attn; ...).",
    )
    quantize_base: Literal["none", "nf4", "int8"] = Field(
        "none",
        description="QLoRA: hold the frozen base in bitsandbytes NF4 (double quantization) or "
        "int8; adapters and their optimizer state stay in full precision.",
    )
    merge: bool = Field(
        False,
        description="Also write `final/merged/`: the adapters merged into the full-precision base, "
        "a plain HF model.",
    )


class Recipe(_Strict):
    """A whole run: what to train, on what data, in which parallel layout."""

    name: str = Field("run", description="Run name; the default `output_dir` is `runs/NAME`.")
    model: str = Field(
        "tiny-llama",
        description="A local directory or hub id of any HF causal LM, or a built-in tiny preset "
        "(`tiny-llama`, `tiny-gpt2`, ...; `dstk env` lists them).",
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with a hub model. Only for models you trust."
    )
    output_dir: str = Field("runs/run", description="The run directory.")
    resume: Literal["auto"] | None = Field(
        None, description="`auto`: continue from the newest complete checkpoint in `output_dir`."
    )
    data: DataConfig = Field(default_factory=DataConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    audit: AuditPolicy = Field(
        default_factory=AuditPolicy, description="The data audit that gates the run."
    )

    @model_validator(mode="after")
    def _layout_rules(self) -> Recipe:
        p, t = self.parallel, self.train
        problems = []
        model_parallel = p.pipeline_stages * p.tensor_parallel
        if p.nproc % model_parallel:
            problems.append(f"parallel.nproc ({p.nproc}) must be a multiple of parallel.pipeline_stages "
                            f"x parallel.tensor_parallel ({model_parallel})")
        if p.pipeline_stages > 1 and p.zero_stage > 1:
            problems.append(f"parallel.zero_stage={p.zero_stage} cannot run with pipeline_stages > 1: "
                            "DeepSpeed's pipeline engine supports ZeRO 0 and 1 only (it accumulates "
                            "gradients per stage, which ZeRO-2/3 partitioning breaks)")
        if p.pipeline_stages > 1 and p.tensor_parallel > 1:
            problems.append("parallel.tensor_parallel > 1 cannot run with pipeline_stages > 1: DeepSpeed "
                            "AutoTP training does not run inside its pipeline engine")
        if p.tensor_parallel > 1 and p.zero_stage == 3:
            problems.append("parallel.tensor_parallel > 1 needs parallel.zero_stage 0, 1 or 2 "
                            "(DeepSpeed AutoTP training does not combine with ZeRO-3)")
        if p.tensor_parallel > 1 and p.offload == "cpu":
            problems.append("parallel.offload=cpu is not supported with tensor_parallel > 1 (use ZeRO-3 with "
                            "offload across the ranks instead, or tensor_parallel without offload)")
        if p.pipeline_partition not in ("parameters", "uniform"):
            pattern = p.pipeline_partition.removeprefix("type:")
            try:
                re.compile(pattern)
            except re.error as err:
                pattern = None
                problems.append(f"parallel.pipeline_partition regex is invalid: {err}")
            if pattern is not None and not p.pipeline_partition.startswith("type:"):
                problems.append("parallel.pipeline_partition must be parameters, uniform or type:REGEX")
        problems += self._node_problems()
        if p.offload == "cpu" and p.zero_stage < 2:
            problems.append("parallel.offload=cpu needs parallel.zero_stage 2 or 3")
        problems += self._lora_problems()
        if t.keep_best and (self.data.eval is None or not t.eval_steps or not t.save_steps
                            or t.save_steps % t.eval_steps):
            problems.append("train.keep_best needs data.eval, train.eval_steps > 0 and train.save_steps a "
                            "multiple of it (a checkpoint is ranked by the eval loss at its own step)")
        if t.compile and p.pipeline_stages > 1:
            problems.append("train.compile=true cannot run with pipeline_stages > 1: DeepSpeed's pipeline "
                            "engine runs its layers one by one, outside a compiled model (drop train.compile)")
        if t.compile and (p.zero_stage == 3 or p.tensor_parallel > 1):
            # measured with DeepSpeed 0.19.8: both train correctly, but their hooks and collectives
            # inside the forward break the graph at every layer, and dynamo's recompile limit is hit
            problems.append("train.compile=true needs parallel.zero_stage 0-2 without tensor_parallel: ZeRO-3's "
                            "parameter gathers and AutoTP's all-reduces break the compiled graph at every layer")
        if t.packing and p.pipeline_stages > 1:
            problems.append("train.packing=true cannot run with pipeline_stages > 1: DeepSpeed's pipeline "
                            "engine needs every micro-batch in one shape, and packed ones vary (drop train.packing, "
                            "or shard with ZeRO instead of stages)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _node_problems(self) -> list[str]:
        p = self.parallel
        problems = []
        if p.nproc % p.nodes:
            problems.append(f"parallel.nproc ({p.nproc}) must be a multiple of parallel.nodes ({p.nodes}): "
                            "every node runs the same number of ranks")
        if p.nodes > 1 and p.hostfile is None and p.master_addr is None:
            problems.append("parallel.nodes > 1 needs parallel.master_addr, the address of node 0 that "
                            "every node can reach")
        if p.node_local_storage and p.hostfile is not None:
            problems.append("parallel.node_local_storage=true needs one launcher per node (dstk train "
                            "--node-rank N on each host); a hostfile launch reads output_dir from shared storage")
        if p.node_local_storage and p.pipeline_stages > 1:
            problems.append("parallel.node_local_storage=true cannot run with pipeline_stages > 1: final/ is "
                            "rebuilt from every stage's layer files, which node-local storage keeps apart "
                            "(use shared storage)")
        return problems

    def _lora_problems(self) -> list[str]:
        lora, p = self.lora, self.parallel
        if not lora.enabled:
            # a lora block without enabled=true would silently train every weight
            if lora != LoraConfig():
                return ["lora.* is set but lora.enabled is false (add lora.enabled=true to train adapters)"]
            return []
        problems = []
        if p.tensor_parallel > 1:
            problems.append("lora.enabled=true with parallel.tensor_parallel > 1 is not available: AutoTP "
                            "would split the adapters' own layers (use ZeRO or pipeline stages)")
        if lora.quantize_base != "none" and p.pipeline_stages > 1:
            problems.append("lora.quantize_base with pipeline_stages > 1 is not available in this version "
                            "(pipeline stages load their layers in full precision; use ZeRO-3 for QLoRA)")
        if lora.quantize_base != "none" and p.offload == "cpu":
            # the optimizer holds only the adapters, a few MB: there is nothing worth offloading
            problems.append("lora.quantize_base with parallel.offload=cpu is not available: QLoRA's optimizer "
                            "holds only the adapters, so there is nothing to offload (drop parallel.offload)")
        return problems

    @property
    def warmup_steps(self) -> int:
        # DeepSpeed's WarmupCosineLR refuses 0 warmup steps; one step from 0 is the shortest warmup
        return max(1, round(self.train.warmup_ratio * self.train.max_steps))

    @property
    def data_parallel(self) -> int:
        """Ranks that hold the same model part and see different data."""
        return self.parallel.nproc // (self.parallel.pipeline_stages * self.parallel.tensor_parallel)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def sha256(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def available_ranks() -> int:
    """Ranks this host can run now: its visible CUDA devices, else the cores this process may use
    (what a scheduler's allocation, CUDA_VISIBLE_DEVICES or taskset gives it)."""
    import torch

    from toolkit.training.shm_collectives import usable_cores

    return torch.cuda.device_count() if torch.cuda.is_available() else usable_cores()


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped inside the package."""
    folder = resources.files("toolkit") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def builtin_path(name: str):
    """The YAML file of a built-in recipe (a ``Traversable``: read it with ``read_text``)."""
    return resources.files("toolkit") / "recipes" / f"{name}.yaml"


def load_recipe(source: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe.

    Args:
        source: a YAML path, a built-in recipe name, or None for the default (`tiny`).
        overrides: dotted `key=value` strings applied after the file (`train.max_steps=20`).

    Returns:
        The validated recipe, every value resolved.

    Raises:
        UserError: the file is missing or not YAML, an override is malformed, or a value is
            invalid; every problem is reported at once, unknown keys with the nearest valid key.
    """
    name, data, origin = _read_source(source)
    for item in overrides or []:
        _apply_override(data, item)
    data.setdefault("name", name)
    data.setdefault("output_dir", f"runs/{data['name']}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise UserError(f"invalid recipe {origin}: " + "; ".join(_describe(e) for e in err.errors()),
                        "fix the recipe or the key=value override") from None
    _refuse_secrets(recipe, origin)
    return recipe


_URL_CREDENTIALS = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


def _refuse_secrets(recipe: Recipe, origin: str) -> None:
    """A recipe is copied into the run directory, run.json and logs, so it must not hold credentials."""
    values = [(key, value) for key, value in _flat(recipe.to_dict()) if isinstance(value, str)]
    found = [(values[i][0], f"{kind} {masked}") for i, kind, masked in
             find([value for _, value in values], ["api_key", "private_key"])]
    found += [(key, "credentials in a URL") for key, value in values if _URL_CREDENTIALS.search(value)]
    if found:
        key, what = found[0]
        raise UserError(f"recipe {origin}: `{key}` holds a secret ({what}); recipes are copied into the run "
                        "directory and its logs", "pass credentials through the environment (HF_TOKEN, "
                        "AWS_*), which dstk never records")


def _flat(data: dict, prefix: str = ""):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def with_values(recipe: Recipe, changes: dict[str, Any]) -> Recipe:
    """A copy of ``recipe`` with dotted keys set (``{"train.max_steps": 5}``), validated again."""
    data = recipe.to_dict()
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = value
    return Recipe.model_validate(data)


def _read_source(source: str | Path | None) -> tuple[str, dict, str]:
    if source is None:
        source = "tiny"
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist",
                            f"pass a YAML path or a built-in recipe: {', '.join(builtin_recipes())}")
        text, name = path.read_text(encoding="utf-8"), path.stem
    else:
        if str(source) not in builtin_recipes():
            close = difflib.get_close_matches(str(source), builtin_recipes(), n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"built-in recipes: {', '.join(builtin_recipes())}"
            raise UserError(f"no recipe file or built-in recipe named {source!r}", hint)
        text = builtin_path(str(source)).read_text(encoding="utf-8")
        name = str(source)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"recipe {source} is not valid YAML: {str(err).splitlines()[0]}",
                        "check the indentation and quoting near that line") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {source} must be a mapping of keys to values, got {type(data).__name__}")
    return name, data, str(source)


def _apply_override(data: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key or key.startswith("-") or any(not part for part in key.split(".")):
        raise UserError(f"override {item!r} is not of the form key=value",
                        "write dotted keys, e.g. train.max_steps=20")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw  # an unparsable value stays a string; the schema then judges it
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {item!r}: `{part}` is a value, not a section")
        node = child
    node[leaf] = value


def _describe(error: dict) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        *parents, leaf = (str(part) for part in error["loc"])
        options = list(_model_at(parents).model_fields)
        close = difflib.get_close_matches(leaf, options, n=1, cutoff=0.5)
        suggestion = f" (did you mean `{'.'.join([*parents, close[0]])}`?)" if close else ""
        return f"unknown key `{loc}`{suggestion}"
    if not loc:  # a cross-field rule of the whole recipe
        return error["msg"].removeprefix("Value error, ")
    return f"`{loc}`: {error['msg']} (got {error.get('input')!r})"


def _model_at(path: list[str]) -> type[BaseModel]:
    model: type[BaseModel] = Recipe
    for part in path:
        annotation = model.model_fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next(c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel))
    return model


def schema_markdown() -> str:
    """A markdown table of every recipe key, its default and its description."""
    rows = ["| key | default | what it does |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            sub = None if typing.get_origin(field.annotation) is list else next(
                (c for c in (field.annotation, *getattr(field.annotation, "__args__", ()))
                 if isinstance(c, type) and issubclass(c, BaseModel)), None)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            desc = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | `{json.dumps(default)}` | {desc} |")

    walk(Recipe, "")
    return "\n".join(rows)


if __name__ == "__main__" and "--markdown" in sys.argv:
    print(schema_markdown())

"""Hostile input: every case gets exit 2 and one line naming the input, before any worker starts.

Each case id is a row of the README's hostile-input table (checked below). The CLI runs in this
process; starting the DeepSpeed launcher fails the test, and an existing run directory given as
``output_dir`` must come out byte for byte unchanged.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT
from toolkit import cli
from toolkit.checkpoints.store import point_latest, tag, write_manifest
from toolkit.launching import launcher


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(n=40):
    return [{"prompt": f"reverse {1000 + i} =", "response": f" {str(1000 + i)[::-1]}"} for i in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs shared by the cases: a tiny model (good, truncated, pickled), a run, data files."""
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hostile")
    config = LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "model")
    truncated = root / "truncated"
    model.save_pretrained(truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((root / "model" / "config.json").read_text())
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    BertModel(BertConfig(vocab_size=96, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(root / "bert")

    run = root / "run"  # a run of tiny-llama on 2 ranks, ZeRO-1, with checkpoints of steps 4 and 8
    for step in (4, 8):
        folder = run / "checkpoints" / tag(step)
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"states")
        write_manifest(folder, step, {"loss": 0.5})
        point_latest(run / "checkpoints", folder.name)
    (run / "checkpoints" / "step_000004" / "mp_rank_00_model_states.pt").write_bytes(b"broken")
    (run / "run.json").write_text(json.dumps({
        "status": "failed", "recipe_sha256": "x", "model": {"name": "tiny-llama"},
        "parallel": {"nproc": 2, "zero_stage": 1, "pipeline_stages": 1, "tensor_parallel": 1}}))

    node_local = root / "node_local_run"  # the same checkpoints, as node 0's disk of a two-node run sees them
    shutil.copytree(run, node_local)
    info = json.loads((node_local / "run.json").read_text())
    info["parallel"].update(nodes=2, node_local_storage=True)
    (node_local / "run.json").write_text(json.dumps(info))

    data = root / "data"
    data.mkdir()
    _jsonl(data / "good.jsonl", _pairs())
    (data / "empty.jsonl").write_text("")
    _jsonl(data / "fields.jsonl", [{"question": "q", "answer": "a"}] * 5)
    (data / "utf8.jsonl").write_bytes((data / "good.jsonl").read_bytes() + b'{"prompt": "\xff\xfe", "response": " x"}\n')
    (data / "json.jsonl").write_text((data / "good.jsonl").read_text() + '{"prompt": "a", "response": }\n')
    with (data / "huge.jsonl").open("w") as out:
        out.write(json.dumps({"prompt": "p", "response": " r"}) + "\n")
        out.write(json.dumps({"prompt": "x" * (100 * 2**20), "response": " r"}) + "\n")
    (data / "manifest_bad.yaml").write_text("license: [MIT\n")
    (data / "manifest_key.yaml").write_text("licence: MIT\n")
    (data / "ds.json").write_text("{not json")
    (data / "list.yaml").write_text("- a\n- b\n")
    (data / "broken.yaml").write_text("train: {max_steps: [1\n")
    (data / "hosts_bad").write_text("node-a slots=2\nnode-b 2\n")
    (data / "hosts_four").write_text("node-a slots=2\nnode-b slots=2\n")
    return root


# id -> (argv given the shared inputs' folder, fragment the error line must hold)
CASES = {
    # recipes
    "recipe-unknown-key": (lambda f: ["train", "train.max_step=3"], "did you mean `train.max_steps`"),
    "recipe-wrong-type": (lambda f: ["train", "train.lr=fast"], "`train.lr`"),
    "recipe-out-of-range": (lambda f: ["train", "parallel.zero_stage=5"], "`parallel.zero_stage`"),
    "recipe-zero-batch": (lambda f: ["train", "train.micro_batch_size=0"], "`train.micro_batch_size`"),
    "recipe-unknown-choice": (lambda f: ["train", "train.precision=fp16"], "`train.precision`"),
    "recipe-pipeline-zero3": (lambda f: ["train", "parallel.pipeline_stages=2", "parallel.zero_stage=3"],
                              "supports ZeRO 0 and 1 only"),
    "recipe-ranks-do-not-divide": (lambda f: ["train", "parallel.nproc=3", "parallel.pipeline_stages=2"],
                                   "must be a multiple of"),
    "recipe-offload-zero1": (lambda f: ["train", "parallel.offload=cpu", "parallel.zero_stage=1"],
                             "needs parallel.zero_stage 2 or 3"),
    "recipe-tp-zero3": (lambda f: ["train", "parallel.tensor_parallel=2", "parallel.zero_stage=3"],
                        "does not combine with ZeRO-3"),
    "recipe-tp-heads": (lambda f: ["train", "parallel.tensor_parallel=2", "model=tiny-gpt2"],
                        "tied input/output embeddings"),
    "recipe-compile-zero3": (lambda f: ["train", "train.compile=true", "parallel.zero_stage=3"],
                             "break the compiled graph at every layer"),
    "recipe-lora-not-enabled": (lambda f: ["train", "lora.r=4"], "lora.enabled is false"),
    "recipe-keep-best-without-eval": (lambda f: ["train", "train.keep_best=1", "data.eval=null"],
                                      "train.keep_best needs data.eval"),
    "recipe-malformed-override": (lambda f: ["train", ".max_steps=3"], "is not of the form key=value"),
    "recipe-missing-file": (lambda f: ["train", str(f / "nope.yaml")], "does not exist"),
    "recipe-not-yaml": (lambda f: ["train", str(f / "data" / "broken.yaml")], "is not valid YAML"),
    "recipe-not-a-mapping": (lambda f: ["train", str(f / "data" / "list.yaml")], "must be a mapping"),
    "recipe-unknown-builtin": (lambda f: ["train", "tinny"], "did you mean `tiny`"),
    "recipe-secret": (lambda f: ["train", "data.train=https://bob:hunter2@example.com/d.jsonl"], "holds a secret"),
    "recipe-ds-config-not-json": (lambda f: ["train", f"parallel.ds_config={f / 'data' / 'ds.json'}"], "ds.json"),
    "recipe-model-missing": (lambda f: ["train", f"model={f / 'no-model'}"], "neither a built-in preset"),
    "recipe-model-not-causal": (lambda f: ["train", f"model={f / 'bert'}"], "not a causal language model"),
    "recipe-nodes-without-master": (lambda f: ["train", "parallel.nodes=2", "--node-rank", "0"],
                                    "needs parallel.master_addr"),
    "recipe-nodes-do-not-divide": (lambda f: ["train", "parallel.nodes=3", "parallel.master_addr=h0"],
                                   "must be a multiple of parallel.nodes (3)"),
    "recipe-node-local-pipeline": (lambda f: ["train", "parallel.node_local_storage=true",
                                              "parallel.pipeline_stages=2"], "keeps apart"),
    "recipe-hostfile-malformed": (lambda f: ["train", f"parallel.hostfile={f / 'data' / 'hosts_bad'}"],
                                  "line 2 is 'node-b 2'"),
    "recipe-hostfile-mismatch": (lambda f: ["train", f"parallel.hostfile={f / 'data' / 'hosts_four'}"],
                                 "set parallel.nodes=2 parallel.nproc=4"),
    # data files
    "data-missing": (lambda f: ["train", f"data.train={f / 'data' / 'nope.jsonl'}"], "does not exist"),
    "data-empty": (lambda f: ["train", f"data.train={f / 'data' / 'empty.jsonl'}", "data.eval=null"], "empty.jsonl"),
    "data-wrong-fields": (lambda f: ["train", f"data.train={f / 'data' / 'fields.jsonl'}", "data.eval=null"],
                          "field 'prompt' not found"),
    "data-invalid-utf8": (lambda f: ["train", f"data.train={f / 'data' / 'utf8.jsonl'}", "data.eval=null"],
                          "invalid UTF-8 (read with U+FFFD); first at line 41"),
    "data-malformed-json": (lambda f: ["train", f"data.train={f / 'data' / 'json.jsonl'}", "data.eval=null"],
                            "could not be parsed (skipped); first at line 41"),
    "data-100mb-record": (lambda f: ["train", f"data.train={f / 'data' / 'huge.jsonl'}", "data.eval=null"],
                          "line 2 is a record of 100.0 MiB"),
    # manifests
    "manifest-not-yaml": (lambda f: ["audit", "--train", str(f / "data" / "good.jsonl"),
                                     "--manifest", str(f / "data" / "manifest_bad.yaml")], "manifest_bad.yaml"),
    "manifest-unknown-key": (lambda f: ["audit", "--train", str(f / "data" / "good.jsonl"),
                                        "--manifest", str(f / "data" / "manifest_key.yaml")], "licence"),
    "manifest-missing": (lambda f: ["audit", "--train", str(f / "data" / "good.jsonl"),
                                    "--manifest", str(f / "data" / "nope.yaml")], "nope.yaml"),
    # checkpoints and model files
    "checkpoint-other-model": (lambda f: ["train", f"output_dir={f / 'run'}", "resume=auto", "model=tiny-gpt2"],
                               "holds checkpoints of model tiny-llama"),
    "checkpoint-other-layout": (lambda f: ["train", f"output_dir={f / 'run'}", "resume=auto", "parallel.zero_stage=0"],
                                "(parallel.zero_stage 1 -> 0): a checkpoint resumed with parallel.zero_stage=0 cannot change layout"),
    "checkpoint-node-local-export": (lambda f: ["export", str(f / "node_local_run"), "--quant", "int8",
                                                "-o", str(f / "out2")], "spread over every node's disk"),
    "checkpoint-rollback-corrupt": (lambda f: ["rollback", str(f / "run"), "--to", "4"], "does not match its sha256"),
    "checkpoint-rollback-missing": (lambda f: ["rollback", str(f / "run"), "--to", "6"], "no checkpoint of step 6"),
    "weights-truncated": (lambda f: ["export", str(f / "truncated"), "--quant", "int8", "-o", str(f / "out1")],
                          "is truncated or corrupt"),
    "weights-pickle": (lambda f: ["eval", str(f / "pickled"), "--data", str(f / "data" / "good.jsonl")],
                       "holds pickle weights only"),
    # command-line flags
    "flag-unknown-quant": (lambda f: ["export", str(f / "model"), "--quant", "int4"], "invalid choice: 'int4'"),
    "flag-export-out-exists": (lambda f: ["export", str(f / "model"), "--quant", "nf4", "-o", str(f / "data")],
                               "already exists"),
    "flag-missing-model-dir": (lambda f: ["eval", str(f / "nothing"), "--data", str(f / "data" / "good.jsonl")],
                               "no such directory"),
    "flag-verify-steps": (lambda f: ["verify", "--steps", "0"], "--steps must be at least 1"),
    "flag-node-rank-one-node": (lambda f: ["train", "--node-rank", "1"], "drop --node-rank"),
    "flag-node-rank-out-of-range": (lambda f: ["train", "parallel.nodes=2", "parallel.master_addr=h0",
                                               "--node-rank", "2"], "outside 0..1"),
    "flag-node-rank-missing": (lambda f: ["train", "parallel.nodes=2", "parallel.master_addr=h0"],
                               "needs --node-rank N on each host"),
    "flag-unknown-command": (lambda f: ["trian"], "invalid choice: 'trian'"),
}


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES)
def test_hostile_input_gets_one_line_and_exit_2(case, files, capsys, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("the DeepSpeed launcher was started")

    monkeypatch.setattr(launcher, "command", no_launch)
    monkeypatch.chdir(files)  # default output_dir runs/NAME lands in the scratch folder
    argv, fragment = CASES[case][0](files), CASES[case][1]
    before = _snapshot(files / "run")
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]  # the rest is progress bars
    assert code == 2, err
    assert len(lines) == 1 and re.match(r"dstk( \w+)?: error: ", lines[0]), err
    assert err.rstrip().endswith(lines[0]) and fragment in lines[0], lines[0]
    assert _snapshot(files / "run") == before


def test_readme_table_lists_every_case():
    readme = (ROOT / "README.md").read_text()
    rows = set(re.findall(r"^\| `([a-z0-9-]+)` \|", readme, flags=re.M))
    assert set(CASES) <= rows, sorted(set(CASES) - rows)
    assert len(CASES) >= 30

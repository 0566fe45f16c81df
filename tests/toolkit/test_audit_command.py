"""`dstk audit`: on files without torch, and on a recipe's data exactly as the training gate audits it."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_dstk, user_env
from toolkit.errors import AuditFailed
from toolkit.plan.prepare import prepare
from toolkit.recipe import load_recipe


def _rows(count: int, start: int = 0) -> str:
    return "".join(json.dumps({"prompt": f"reverse {n} =", "response": f" {str(n)[::-1]}"}) + "\n"
                   for n in range(start, start + count))


def test_data_checks_imports_nothing_from_toolkit():
    imported = set()
    for path in (ROOT / "data_checks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add((path.name, node.module.split(".")[0]))
            elif isinstance(node, ast.Import):
                imported.update((path.name, alias.name.split(".")[0]) for alias in node.names)
    assert {name for name, package in imported if package in ("toolkit", "torch", "deepspeed")} == set()


def test_files_are_audited_where_torch_cannot_be_imported(tmp_path):
    """`import torch` fails in this environment; `dstk audit` on files and `data_checks.audit` still run."""
    import os

    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n')
    (tmp_path / "train.jsonl").write_text(_rows(300, 1000))
    (tmp_path / "eval.jsonl").write_text(_rows(10, 1000))  # every eval record leaked into train
    env = user_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")  # the torch that cannot be imported first
    proc = run_dstk("audit", "--train", tmp_path / "train.jsonl", "--eval", tmp_path / "eval.jsonl",
                    "--report", tmp_path / "out", cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr[-2000:]  # the leak fails the audit
    assert "exact_duplicate" in proc.stdout and (tmp_path / "out" / "report.json").is_file()
    script = ("import sys, data_checks\n"
              "from data_checks import DataSpec\n"
              f"report = data_checks.audit(DataSpec(path={str(tmp_path / 'train.jsonl')!r}))\n"
              "assert 'torch' not in sys.modules, 'torch was imported'\n"
              "print(report.verdict)\n")
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "pass", run.stderr[-2000:]


def test_a_recipe_audit_counts_model_tokens_and_leaves_the_run_alone(tmp_path):
    """The same overlong records as the gate (the tiny model's tokens are characters, not words), and
    the run's audit/report.json stays the one its run.json hashes."""
    (tmp_path / "train.jsonl").write_text(_rows(200, 10_000))
    (tmp_path / "eval.jsonl").write_text(_rows(20, 50_000))
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'train.jsonl'}",
                 f"data.eval={tmp_path / 'eval.jsonl'}", "train.seq_len=16"]
    run = prepare(load_recipe("tiny", overrides))  # writes the gate's audit/report.json, no worker
    gate_report = tmp_path / "run" / "audit" / "report.json"
    before = gate_report.read_bytes()
    proc = run_dstk("audit", "tiny", *overrides, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert gate_report.read_bytes() == before
    from data_checks.files import sha256_file

    assert sha256_file(gate_report) == run["audit"]["report_sha256"]

    def overlong(report: Path) -> int:
        findings = json.loads(report.read_text())["findings"]
        return sum(len(f["records"]) for f in findings if f["check"] == "overlong_record")

    assert overlong(tmp_path / "audit_report" / "report.json") == overlong(gate_report) == 220


def test_a_data_file_given_as_the_recipe_gets_a_hint(tmp_path):
    (tmp_path / "train.jsonl").write_text(_rows(5))
    proc = run_dstk("audit", tmp_path / "train.jsonl", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and f"pass it as --train {tmp_path / 'train.jsonl'}" in proc.stderr


def test_the_gate_says_its_warnings_and_counts_only_failing_findings(tmp_path, capsys):
    """A passing gate prints its warnings (records it will truncate); a failing one counts the
    findings at the failing severity, not every finding."""
    overrides = [f"output_dir={tmp_path / 'run'}", "train.seq_len=16", "data.eval_limit=8"]
    prepare(load_recipe("tiny", overrides))
    err = capsys.readouterr().err
    assert "dstk: audit warning: overlong_record: " in err and "will be truncated" in err
    assert f"audit passed with 2 warning(s) (see {tmp_path / 'run' / 'audit' / 'report.md'})" in err

    rows = [json.loads(line) for line in _rows(200, 1000).splitlines()]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:3]))  # 3 copies
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))  # 2 leaked
    with pytest.raises(AuditFailed, match=r"failed with 2 finding\(s\) of severity error or above \(and \d+ below it\)"):
        prepare(load_recipe("tiny", [f"output_dir={tmp_path / 'leaky'}", f"data.train={tmp_path / 'train.jsonl'}",
                                     f"data.eval={tmp_path / 'eval.jsonl'}"]))

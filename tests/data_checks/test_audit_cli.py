"""The audit of data files (``python -m data_checks.cli``, ``dstk audit --train``): exit codes 0/1/2,
flags, the manifest draft."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from audit_data import write_jsonl

from data_checks.cli import add_arguments, main


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_checks.cli", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def files(tmp_path, clean_rows):
    return (write_jsonl(tmp_path / "train.jsonl", clean_rows[0][:300]),
            write_jsonl(tmp_path / "eval.jsonl", clean_rows[1][:30]))


def test_clean_data_exits_0_and_prints_the_summary(tmp_path, files):
    result = _cli("--train", str(files[0]), "--eval", str(files[1]), "--report", str(tmp_path / "out"))
    assert (result.returncode, "audit PASS" in result.stdout, (tmp_path / "out" / "report.json").exists()) == (
        0, True, True)


def test_missing_file_exits_2_with_one_line(tmp_path):
    result = _cli("--train", str(tmp_path / "missing.jsonl"))
    assert (result.returncode, result.stderr.count("\n"), result.stderr.startswith("dstk audit: error: ")) == (
        2, 1, True)


def test_leaked_eval_record_exits_1(tmp_path, clean_rows):
    train = write_jsonl(tmp_path / "train.jsonl", clean_rows[0][:300] + clean_rows[1][:1])
    eval_ = write_jsonl(tmp_path / "eval.jsonl", clean_rows[1][:30])
    assert main(["--train", str(train), "--eval", str(eval_), "--report", str(tmp_path / "out")]) == 1


def test_field_flags_choose_the_fields(tmp_path, capsys):
    rows = [{"question": f"How many legs do {n} spiders have in total?", "answer": str(8 * n)} for n in range(40)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    code = main(["--train", str(train), "--prompt-field", "question", "--response-field", "answer",
                 "--report", str(tmp_path / "out")])
    assert (code, '"format": "instruction"' in (tmp_path / "out" / "report.json").read_text()) == (0, True)


def test_wrong_field_flag_exits_2(tmp_path, files, capsys):
    code = main(["--train", str(files[0]), "--prompt-field", "question", "--report", str(tmp_path / "out")])
    assert (code, "field 'question' not found" in capsys.readouterr().err) == (2, True)


def test_init_manifest_then_audit_flags_the_unfilled_fields(tmp_path, files, capsys):
    manifest = tmp_path / "manifest.yaml"
    assert main(["--train", str(files[0]), "--eval", str(files[1]), "--manifest", str(manifest),
                 "--init-manifest"]) == 0
    assert main(["--train", str(files[0]), "--eval", str(files[1]), "--manifest", str(manifest),
                 "--report", str(tmp_path / "out")]) == 1
    assert "provenance" in capsys.readouterr().out


def test_init_manifest_refuses_to_overwrite(tmp_path, files, capsys):
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("keep me")
    assert (main(["--train", str(files[0]), "--manifest", str(manifest), "--init-manifest"]),
            manifest.read_text()) == (2, "keep me")


def test_the_flags_work_on_any_parser(tmp_path, files):
    parser = argparse.ArgumentParser(prog="dstk audit")
    add_arguments(parser)
    args = parser.parse_args(["--train", str(files[0]), "--fail-on", "info", "--report", str(tmp_path / "out")])
    assert args.run(args) == 1  # the "no manifest" info finding fails at --fail-on info


def test_nothing_to_audit_exits_2(capsys):
    assert (main([]), "pass --train FILE" in capsys.readouterr().err) == (2, True)

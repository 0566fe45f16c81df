"""Unusable input: AuditInputError with one line that names the input, the problem and the fix."""

from __future__ import annotations

import pytest
from audit_data import write_jsonl

from data_checks import AuditInputError, AuditPolicy, DataSpec, audit


def _error(*args, **kwargs) -> str:
    with pytest.raises(AuditInputError) as info:
        audit(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file_is_named(tmp_path):
    assert f"train data {tmp_path}/nope.jsonl does not exist" in _error(str(tmp_path / "nope.jsonl"))


def test_absent_field_names_it_and_the_fields_present(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": "a"}])
    message = _error(DataSpec(path=str(path), format="instruction", prompt_field="question"))
    assert "field 'response' not found; fields present: question, answer" in message
    assert "--response-field" in message


def test_undetectable_format_lists_the_fields(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": "a"}])
    assert "fields (question, answer)" in _error(str(path))


def test_malformed_json_document_names_the_line(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[{"text": "a"},\n {"text": }]\n')
    assert f"{path} line 2 column" in _error(str(path))


def test_jsonl_without_a_readable_row_names_the_first_bad_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("not json\nalso not\n")
    assert f"{path} line 1" in _error(str(path))


def test_empty_file_is_unusable(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n")
    assert "no readable JSON row" in _error(str(path))


def test_duplicate_set_names_are_unusable(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}])
    assert "named 'x'" in _error(str(path), benchmarks=[DataSpec(path=str(path), split="x"),
                                                        DataSpec(path=str(path), split="x")])


def test_redaction_without_report_dir_is_unusable(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}])
    assert "--report DIR" in _error(str(path), policy=AuditPolicy(pii={"email": "redact"}))


def test_manifest_with_bad_yaml_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}])
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("name: x\nfiles: [\n  - path: t.jsonl\n")
    assert f"manifest {manifest} line" in _error(str(path), manifest=manifest)


def test_manifest_with_unknown_key_names_the_key(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}])
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("name: x\nlicence: MIT\nfiles: [{path: t.jsonl, sha256: " + "ab" * 32 + "}]\n")
    assert "licence: Extra inputs are not permitted" in _error(str(path), manifest=manifest)


def test_unreadable_csv_is_unusable(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b'text\n"unterminated\n')
    assert "cannot be read as CSV" in _error(str(path))


def test_policy_rejects_unknown_keys_and_out_of_range_values():
    with pytest.raises(ValueError, match="treshold"):
        AuditPolicy(duplicates={"treshold": 0.5})
    with pytest.raises(ValueError, match="less than or equal to 1"):
        AuditPolicy(duplicates={"threshold": 1.5})


def test_benchmarks_with_the_same_file_name_get_their_folder_in_front(tmp_path):
    paths = []
    for folder in ("mmlu", "gsm8k"):
        (tmp_path / folder).mkdir()
        paths.append(str(write_jsonl(tmp_path / folder / "test.jsonl", [{"text": f"{folder} question one two"}])))
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a b c"}])
    report = audit(str(train), benchmarks=paths)
    assert [i["split"] for i in report.inputs] == ["train", "mmlu_test", "gsm8k_test"]

"""Provenance manifests: drafting, and every mismatch as a provenance finding."""

from __future__ import annotations

import yaml
from audit_data import write_jsonl

from data_checks import AuditPolicy, audit
from data_checks.manifest import draft_manifest

FILLED = {"version": "1.0", "license": "MIT", "use": "commercial", "creators": ["dstk tests"],
          "sources": [{"uri": "https://example.org/data", "revision": "abc123", "retrieved": "2024-05-01"}],
          "model_generated": False}


def _setup(tmp_path, clean_rows, **changes):
    train = write_jsonl(tmp_path / "train.jsonl", clean_rows[0][:100])
    eval_ = write_jsonl(tmp_path / "eval.jsonl", clean_rows[1][:20])
    manifest = tmp_path / "manifest.yaml"
    draft_manifest([train, eval_], manifest)
    content = yaml.safe_load(manifest.read_text())
    content.update(FILLED)
    content.update(changes)
    manifest.write_text(yaml.safe_dump(content))
    return train, eval_, manifest


def _provenance(report) -> list[str]:
    return [f.message for f in report.findings if f.check == "provenance" and f.severity == "error"]


def test_draft_pins_hashes_and_counts_and_leaves_provenance_empty(tmp_path, clean_rows):
    train = write_jsonl(tmp_path / "train.jsonl", clean_rows[0][:100])
    draft = yaml.safe_load(draft_manifest([train], tmp_path / "manifest.yaml"))
    assert (draft["files"][0]["path"], draft["files"][0]["records"], len(draft["files"][0]["sha256"]),
            draft["license"]) == ("train.jsonl", 100, 64, None)


def test_filled_manifest_passes(tmp_path, clean_rows):
    train, eval_, manifest = _setup(tmp_path, clean_rows)
    report = audit(str(train), str(eval_), manifest=manifest)
    assert (_provenance(report), report.verdict) == ([], "pass")


def test_unfilled_draft_names_the_empty_required_fields(tmp_path, clean_rows):
    train = write_jsonl(tmp_path / "train.jsonl", clean_rows[0][:100])
    draft_manifest([train], tmp_path / "manifest.yaml")
    finding = next(f for f in audit(str(train), manifest=tmp_path / "manifest.yaml").findings
                   if f.check == "provenance")
    assert finding.evidence["missing_fields"] == ["version", "license", "use", "sources", "creators",
                                                  "model_generated"]


def test_changed_file_fails_its_checksum(tmp_path, clean_rows):
    train, eval_, manifest = _setup(tmp_path, clean_rows)
    write_jsonl(eval_, clean_rows[1][1:21])  # same count, other bytes
    finding = next(f for f in audit(str(train), str(eval_), manifest=manifest).findings
                   if f.check == "provenance" and "sha256" in f.message)
    assert (finding.severity, finding.evidence["file"], finding.evidence["expected"] != finding.evidence["actual"]) == (
        "error", "eval.jsonl", True)


def test_wrong_record_count_is_reported(tmp_path, clean_rows):
    train, eval_, manifest = _setup(tmp_path, clean_rows)
    content = yaml.safe_load(manifest.read_text())
    content["files"][0]["records"] = 99
    manifest.write_text(yaml.safe_dump(content))
    assert _provenance(audit(str(train), manifest=manifest)) == [
        f"manifest {manifest}: train.jsonl has 100 records, the manifest says 99"]


def test_unlisted_data_file_is_reported(tmp_path, clean_rows):
    train, _, manifest = _setup(tmp_path, clean_rows)
    other = write_jsonl(tmp_path / "other.jsonl", clean_rows[1][:5])
    assert any("other.jsonl is not listed" in m for m in _provenance(audit(str(train), str(other), manifest=manifest)))


def test_path_escaping_the_manifest_folder_is_reported(tmp_path, clean_rows):
    train, _, manifest = _setup(tmp_path, clean_rows)
    content = yaml.safe_load(manifest.read_text())
    content["files"].append({"path": "../elsewhere.jsonl", "sha256": "ab" * 32})
    manifest.write_text(yaml.safe_dump(content))
    assert any("escapes" in m for m in _provenance(audit(str(train), manifest=manifest)))


def test_denied_license_fails(tmp_path, clean_rows):
    train, _, manifest = _setup(tmp_path, clean_rows, license="CC-BY-NC-4.0", use="non-commercial")
    policy = AuditPolicy(provenance={"license_deny": ["CC-BY-NC-4.0"], "allowed_uses": ["commercial"]})
    messages = _provenance(audit(str(train), manifest=manifest, policy=policy))
    assert (any("license 'CC-BY-NC-4.0'" in m for m in messages), any("use 'non-commercial'" in m for m in messages)) == (
        True, True)


def test_license_expression_passes_when_one_alternative_is_allowed(tmp_path, clean_rows):
    train, _, manifest = _setup(tmp_path, clean_rows, license="GPL-3.0-only OR MIT")
    policy = AuditPolicy(provenance={"license_allow": ["MIT", "Apache-2.0"]})
    assert _provenance(audit(str(train), manifest=manifest, policy=policy)) == []


def test_required_manifest_missing_is_an_error(tmp_path, clean_rows):
    train = write_jsonl(tmp_path / "train.jsonl", clean_rows[0][:50])
    report = audit(str(train), policy=AuditPolicy(provenance={"require_manifest": True}))
    assert (report.verdict, _provenance(report)[0].startswith("no provenance manifest")) == ("fail", True)

"""What to audit and how strictly: the data set descriptions and the audit policy.

:class:`AuditPolicy` is the ``audit:`` block of a training recipe, so every field is documented here,
in one place, and unknown keys are errors. The defaults are meant to pass clean templated data (many
rows sharing a prompt template) and to fail on leakage between training and held-out data.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Severity = Literal["info", "warning", "error"]
SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "error": 2}
Format = Literal["text", "instruction", "chat"]
Role = Literal["train", "eval", "benchmark"]
Use = Literal["commercial", "non-commercial", "research"]
PiiAction = Literal["off", "warn", "fail", "redact"]
ManifestField = Literal[
    "name", "version", "description", "license", "use", "creators", "sources", "derived_from",
    "model_generated",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    """One data set to audit and the fields that hold its text."""

    path: str = Field(
        description="A data file (JSONL, JSON, CSV, TSV, Parquet, TXT), a folder of such files, or a "
        "hub id (`owner/name`, or `owner/name:split` for a split other than `train`)."
    )
    split: str | None = Field(
        default=None,
        description="The set's name in the report's records; unset: `train`, `eval`, or the "
        "benchmark's file name without extension.",
    )
    format: Format | None = Field(
        default=None,
        description="`text` (one text field), `instruction` (prompt and response fields) or `chat` "
        "(a list of {role, content} messages); unset: detected from the fields present.",
    )
    text_field: str = Field(default="text", description="The text field of the `text` format.")
    prompt_field: str = Field(default="prompt", description="The prompt field of `instruction`.")
    response_field: str = Field(default="response", description="The response field of `instruction`.")
    messages_field: str = Field(default="messages", description="The message list of `chat`.")


class ProvenancePolicy(_Strict):
    """Checks on the provenance manifest (see ``data_checks.manifest``)."""

    require_manifest: bool = Field(
        default=False, description="Fail the audit when no manifest is given (otherwise: an info finding)."
    )
    required_fields: list[ManifestField] = Field(
        default=["name", "version", "license", "use", "sources", "creators", "model_generated"],
        description="Manifest fields that must be present and non-empty.",
    )
    license_allow: list[str] = Field(
        default=[], description="SPDX license ids allowed; empty: any license that is not denied."
    )
    license_deny: list[str] = Field(default=[], description="SPDX license ids that fail the audit.")
    allowed_uses: list[Use] = Field(
        default=["commercial", "non-commercial", "research"],
        description="Use classes a data set's license may have; drop `research` and `non-commercial` "
        "for a model you will sell.",
    )


class DuplicatePolicy(_Strict):
    """Exact duplicates (after normalization) and near duplicates (MinHash LSH, then true Jaccard)."""

    enabled: bool = Field(default=True, description="Run the duplicate checks (exact; near too when `near`).")
    near: bool = Field(default=True, description="Also run the near-duplicate check.")
    threshold: float = Field(
        default=0.8, ge=0.5, le=1.0,
        description="Jaccard similarity of word shingles at which two records are near duplicates.",
    )
    num_perm: int = Field(
        default=128, ge=16, le=1024,
        description="MinHash permutations; more cost time and find fewer false candidates. Bands are "
        "chosen so that a pair at the threshold is a candidate with probability >= 0.99.",
    )
    shingle_words: int = Field(
        default=5, ge=1, le=16,
        description="Words per shingle. 5 keeps templated records that differ in a number or a name "
        "(`What is 12+34?` / `What is 12+35?`) far apart; 1 compares bags of words.",
    )


class ContaminationPolicy(_Strict):
    """How much of each eval and benchmark item the training data covers with shared n-grams."""

    enabled: bool = Field(default=True, description="Run the n-gram contamination check.")
    ngram: int = Field(
        default=5, ge=3, le=64,
        description="Words per n-gram. 5 keeps a copy found when one word in ten is edited (each edit "
        "breaks only the n-grams across it); different problems are told apart by needing one record to "
        "cover the item (`benchmarks/contamination_recall.py` measures both). Items with fewer words are "
        "left to the exact and near duplicate checks.",
    )
    min_coverage: float = Field(
        default=0.5, gt=0.0, le=1.0,
        description="Fraction of an item's words inside n-grams it shares with one reference record that "
        "makes it contaminated: scattered edits, swapped numbers and reordered sentences leave most words "
        "covered. Compared text: the prompt (instruction), the user turns (chat), the text.",
    )
    min_span: int = Field(
        default=50, ge=3,
        description="Words in one run of consecutive shared n-grams that makes an item contaminated "
        "whatever its coverage: a long passage copied from a longer item.",
    )
    numbers_as_one: bool = Field(
        default=True,
        description="Words that start with a digit (12, 3rd, 5pm) compare equal, so an item with its "
        "numbers swapped (a GSM8K-style rewrite) is still found.",
    )
    boilerplate_fraction: float = Field(
        default=0.01, gt=0.0, le=1.0,
        description="An n-gram found in at least this fraction of one set's items (and in 3 or more) "
        "is template boilerplate, not content: it neither covers nor counts.",
    )


class PiiPolicy(_Strict):
    """PII and secret detectors, each with an action: off, warn, fail, or redact (write a copy)."""

    enabled: bool = Field(default=True, description="Run the PII and secrets scan on train and eval.")
    email: PiiAction = Field(default="warn", description="Email addresses.")
    phone: PiiAction = Field(default="warn", description="Phone numbers (NANP and +country forms).")
    ip_address: PiiAction = Field(default="warn", description="IPv4 and IPv6 addresses.")
    credit_card: PiiAction = Field(default="fail", description="Payment card numbers (Luhn-checked).")
    iban: PiiAction = Field(default="fail", description="IBANs (mod-97 checked).")
    api_key: PiiAction = Field(
        default="fail", description="API keys and tokens: known prefixes, or a key-like name with a "
        "high-entropy value.",
    )
    private_key: PiiAction = Field(default="fail", description="PEM private key blocks.")


class QualityPolicy(_Strict):
    """Record-level checks: unreadable rows, invalid UTF-8, missing or empty fields, length."""

    enabled: bool = Field(default=True, description="Run the record quality checks.")
    max_tokens: int | None = Field(
        default=None, ge=1,
        description="Records longer than this many tokens are reported (a warning: they will be "
        "truncated); unset: the recipe's train.seq_len.",
    )
    max_duplicate_fraction: float = Field(
        default=0.5, gt=0.0, le=1.0,
        description="A train or eval set with more than this fraction of redundant exact copies fails.",
    )


class PoisoningPolicy(_Strict):
    """Screen for planted triggers: a rare phrase in many prompts, always with the same response."""

    enabled: bool = Field(default=True, description="Run the trigger-phrase screen on train.")
    min_records: int = Field(
        default=10, ge=2, description="Distinct prompts a phrase must recur in to be reported."
    )
    min_purity: float = Field(
        default=0.9, gt=0.5, le=1.0,
        description="Share of the phrase's prompts that must have the same response.",
    )
    max_phrase_fraction: float = Field(
        default=0.05, gt=0.0, le=1.0,
        description="A phrase in more than this fraction of distinct prompts is common, not rare.",
    )
    max_phrase_words: int = Field(default=3, ge=1, le=8, description="Longest phrase tried, in words.")


class AuditPolicy(_Strict):
    """The data audit: which checks run, their thresholds, and what fails a run."""

    enforce: bool = Field(
        default=True,
        description="Run the audit as a gate before training; false skips it, and run.json records that.",
    )
    fail_on: Severity = Field(
        default="error", description="The lowest finding severity that fails the audit (exit 1)."
    )
    manifest: str | None = Field(
        default=None, description="Provenance manifest (YAML) of the training and eval files."
    )
    benchmarks: list[DataSpec] = Field(
        default=[], description="Benchmarks the training data must not contain (paths and fields)."
    )
    leakage_severity: Severity = Field(
        default="error",
        description="Severity of records shared by train and eval or a benchmark (exact, near, n-gram).",
    )
    overlap_severity: Severity = Field(
        default="warning",
        description="Severity of duplicates inside one set, and of eval items found in a benchmark.",
    )
    provenance: ProvenancePolicy = Field(default_factory=ProvenancePolicy)
    duplicates: DuplicatePolicy = Field(default_factory=DuplicatePolicy)
    contamination: ContaminationPolicy = Field(default_factory=ContaminationPolicy)
    pii: PiiPolicy = Field(default_factory=PiiPolicy)
    quality: QualityPolicy = Field(default_factory=QualityPolicy)
    poisoning: PoisoningPolicy = Field(default_factory=PoisoningPolicy)
    workers: int = Field(
        default=1, ge=0, le=64,
        description="Processes that hash large sets (50k records or more); 0: one per CPU core, at most "
        "8. More than 1 starts `spawn` processes, so a calling script needs an "
        "`if __name__ == \"__main__\":` guard. On 2 cores one process is fastest (measured).",
    )

    def severity_between(self, roles: set[str]) -> Severity | None:
        """Severity of records shared between sets of these roles; None: not the user's concern.

        Args:
            roles: The roles (``train``, ``eval``, ``benchmark``) of the records involved; one role
                means duplicates inside one set.

        Returns:
            ``leakage_severity`` when train meets held-out data, ``overlap_severity`` inside train or
            eval or between eval and a benchmark, None for benchmarks among themselves.
        """
        if "train" in roles and roles - {"train"}:
            return self.leakage_severity
        if roles & {"train", "eval"}:
            return self.overlap_severity
        return None

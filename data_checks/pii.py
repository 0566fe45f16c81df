"""PII and secret detectors, and redaction.

Each detector is a regex for candidates plus a validator that rejects look-alikes: the Luhn check
and card-network prefixes for payment cards, mod-97 and the country's length for IBANs,
``ipaddress`` for IP addresses, digit counts for phone numbers, and Shannon entropy for keys (so
``sk-xxxxxxxxxxxxxxxxxxxx`` placeholders and ``api_key = "your-key-here"`` pass). Regexes run over a
whole batch joined into one string, so scanning costs one C-level pass per detector, not one Python
call per record. Reports never show a found value in full: :func:`mask` keeps its ends only.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # worker processes import this module without `datasets`
    from data_checks.sources import Source

_SEP = "\x00"  # joins a batch's texts; no detector matches across it

# IBAN length per country (ISO 13616 registry).
_IBAN_LENGTHS = {entry[:2]: int(entry[2:]) for entry in (
    "AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BR29 CH21 CR22 CY28 CZ24 DE22 DK18 DO28 EE20 EG29 "
    "ES24 FI18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HR21 HU28 IE22 IL23 IQ23 IS26 IT27 JO30 KW30 "
    "KZ20 LB28 LC32 LI21 LT20 LU20 LV21 MC27 MD24 ME22 MK19 MR27 MT31 MU30 NL18 NO15 PK24 PL28 PS29 "
    "PT25 QA29 RO24 RS22 SA24 SC31 SE24 SI19 SK24 SM27 TN24 TR26 UA29 VA22 VG24 XK20").split()}


@dataclass(frozen=True)
class Detector:
    """A PII kind: candidate regex, and a validator of each candidate match."""

    kind: str
    pattern: re.Pattern
    valid: Callable[[re.Match], bool]
    group: str | int = 0  # the part of a match that is the PII (what is masked and redacted)
    hints: tuple[str, ...] = ()  # a match contains one of these: skip the regex when none occurs
    # (characters, count, width): every match has `count` of these characters within `width`
    # characters, so the regex only runs on such windows, found with numpy.
    dense: tuple[str, int, int] | None = None


def _entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(value)
    return -sum(n / len(value) * math.log2(n / len(value)) for n in counts.values())


def _luhn(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        d = int(char) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _card(match: re.Match) -> bool:
    digits = re.sub(r"\D", "", match.group())
    n, two, four = len(digits), int(digits[:2]), int(digits[:4])
    network = (
        (digits[0] == "4" and n in (13, 16, 19))  # Visa
        or ((51 <= two <= 55 or 2221 <= four <= 2720) and n == 16)  # Mastercard
        or (two in (34, 37) and n == 15)  # American Express
        or ((four == 6011 or two == 65 or 644 <= int(digits[:3]) <= 649) and 16 <= n <= 19)  # Discover
        or (two == 35 and 16 <= n <= 19)  # JCB
        or ((300 <= int(digits[:3]) <= 305 or two in (36, 38)) and n == 14)  # Diners Club
    )
    return network and _luhn(digits)


def _iban(match: re.Match) -> bool:
    compact = match.group().replace(" ", "")
    length = _IBAN_LENGTHS.get(compact[:2])
    if length is None or len(compact) != length:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _ip(match: re.Match) -> bool:
    try:
        address = ipaddress.ip_address(match.group())
    except ValueError:
        return False
    return address.version == 4 or match.group().count(":") >= 2 and len(match.group()) >= 6


def _phone(match: re.Match) -> bool:
    return 8 <= sum(c.isdigit() for c in match.group()) <= 15


_KEY_NAME = re.compile(r"(?i:\b(?:api[_-]?key|secret(?:[_-]key)?|access[_-]?key|auth[_-]?token|token"
                       r"|password|passwd))[\"']?\s*$")


def _prefixed_key(match: re.Match) -> bool:
    return _entropy(match.group("secret")) >= 3.0  # a known prefix: reject only placeholders


def _assigned_key(match: re.Match) -> bool:
    # The regex starts at `:` or `=` (a fast scan); the key's name must come just before it.
    if not _KEY_NAME.search(match.string, max(0, match.start() - 32), match.start()):
        return False
    value = match.group("value")
    return _entropy(value) >= 3.5 and any(c.isdigit() for c in value) and any(c.isalpha() for c in value)


def _always(match: re.Match) -> bool:
    return True


_DIGITS = "0123456789"
DETECTORS: tuple[Detector, ...] = (
    Detector("email", re.compile(
        r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b"),
        _always, dense=("@", 1, 1)),
    Detector("phone", re.compile(
        # Not inside arithmetic: no operator or digit right before or after (6000-600-150-1200-2000).
        r"(?<![\w+)*/=.,-])(?:\+\d{1,3}[ .-]?\(?\d{1,4}\)?(?:[ .-]?\d{2,4}){2,4}"  # +44 20 7946 0958
        r"|(?:\+?1[ .-])?(?:\([2-9]\d\d\) ?|[2-9]\d\d[ .-])\d{3}[ .-]\d{4})(?![\w+*/=-]|[.,]\d)"),  # (555) 123-4567
        _phone, dense=(_DIGITS, 8, 22)),
    Detector("ip_address", re.compile(
        r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
        r"(?![\w]|\.\d)"), _ip, dense=(".", 3, 15)),
    Detector("ip_address", re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"),
             _ip, dense=(":", 2, 40)),
    Detector("credit_card", re.compile(
        r"(?<![\w-])(?:\d{4}(?:[ -]\d{4}){3}(?:[ -]?\d{3})?|\d{4}[ -]\d{6}[ -]\d{4,5}|\d{13,19})(?![\w-])"),
        _card, dense=(_DIGITS, 13, 23)),
    Detector("iban", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), _iban,
             dense=(_DIGITS, 8, 42)),
    Detector("api_key", re.compile(
        r"(?P<prefix>\b(?:AKIA|ASIA)(?=[0-9A-Z]{16}\b)|\bgh[pousr]_|\bgithub_pat_|\bglpat-|\bxox[abposr]-"
        r"|\bsk-(?:proj-|ant-)?|\bAIza|\b[sr]k_(?:live|test)_|\bhf_|\bnpm_)(?P<secret>[\w-]{16,255})"),
        _prefixed_key, hints=("AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-",
                              "xox", "sk-", "AIza", "k_live_", "k_test_", "hf_", "npm_")),
    Detector("api_key", re.compile(r"[:=][ \t]*[\"']?(?P<value>[\w+/=.-]{16,})"), _assigned_key,
             group="value"),
    Detector("private_key", re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
             _always, hints=("PRIVATE KEY",)),
)
KINDS: tuple[str, ...] = tuple(dict.fromkeys(d.kind for d in DETECTORS))


def find(texts: Sequence[str], kinds: Iterable[str]) -> list[tuple[int, str, str]]:
    """Find PII in a batch of texts.

    Args:
        texts: Raw texts (not normalized: case and punctuation matter here).
        kinds: The kinds to look for, from :data:`KINDS`.

    Returns:
        ``(text index, kind, masked value)`` per match.
    """
    wanted = set(kinds)
    joined = _SEP.join(texts)
    ends = np.cumsum([len(t) + 1 for t in texts])  # one past each text's separator
    codes = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)  # one entry per character
    found = []
    for detector in DETECTORS:
        if detector.kind not in wanted or (detector.hints and not any(h in joined for h in detector.hints)):
            continue
        for start, stop in _windows(codes, detector.dense):
            for match in detector.pattern.finditer(joined, start, stop):
                if detector.valid(match):
                    owner = int(np.searchsorted(ends, match.start(), side="right"))
                    found.append((owner, detector.kind, mask(match.group(detector.group), detector.kind)))
    return found


def _windows(codes: np.ndarray, dense: tuple[str, int, int] | None) -> list[tuple[int, int]]:
    """Character ranges that may hold a match: all of it, or where the characters are dense."""
    if dense is None:
        return [(0, codes.size)]
    chars, count, width = dense
    hits = np.isin(codes, np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32))
    cumulative = np.concatenate(([0], np.cumsum(hits)))
    if codes.size < width:
        return [(0, codes.size)] if cumulative[-1] >= count else []
    starts = np.flatnonzero(cumulative[width:] - cumulative[:-width] >= count)
    if starts.size == 0:
        return []
    margin = 64  # context for look-arounds, and room for a match that runs past the dense part
    lo, hi = np.maximum(starts - margin, 0), np.minimum(starts + width + margin, codes.size)
    breaks = np.flatnonzero(lo[1:] > hi[:-1]) + 1  # hi grows with lo: overlapping windows merge
    ranges = zip(lo[np.r_[0, breaks]].tolist(), hi[np.r_[breaks - 1, hi.size - 1]].tolist())
    return list(ranges)


def redact(text: str, kinds: Iterable[str]) -> str:
    """Replace every valid match of the given kinds by ``[KIND]``."""
    wanted = set(kinds)
    for detector in DETECTORS:
        if detector.kind in wanted:
            text = detector.pattern.sub(lambda m, d=detector: _redacted(m, d), text)
    return text


def _redacted(match: re.Match, detector: Detector) -> str:
    """The match with its PII part replaced by ``[KIND]``, or unchanged when it is not valid."""
    if not detector.valid(match):
        return match.group()
    start, end = match.span(detector.group)
    offset = match.start()
    return match.group()[:start - offset] + f"[{detector.kind.upper()}]" + match.group()[end - offset:]


def mask(value: str, kind: str) -> str:
    """Show a found value without disclosing it: its first and last two characters."""
    if kind == "private_key":
        return value  # the PEM header names the key type; the key itself follows it
    return value[:2] + "*" * max(len(value) - 4, 4) + value[-2:] if len(value) > 6 else "*" * len(value)


def write_redacted_copy(source: Source, positions: Iterable[int], kinds: Iterable[str], out: Path) -> None:
    """Write a JSON-lines copy of a set with PII of ``kinds`` redacted in its text fields.

    The input is never modified. Rows other than ``positions`` are copied as they are; rows the
    reader could not parse are left out.

    Args:
        source: The set.
        positions: Loaded rows that hold PII to redact.
        kinds: PII kinds to redact.
        out: The copy's path.
    """
    flagged, kinds = set(positions), tuple(kinds)
    spec = source.spec
    text_fields = {"text": [spec.text_field], "instruction": [spec.prompt_field, spec.response_field],
                   "chat": []}[source.format]
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as handle:
        for start in range(0, len(source.dataset), 1000):
            columns = source.dataset[start:start + 1000]
            for offset, row in enumerate(dict(zip(columns, values)) for values in zip(*columns.values())):
                if start + offset in flagged:
                    for name in text_fields:
                        if isinstance(row.get(name), str):
                            row[name] = redact(row[name], kinds)
                    messages = row.get(spec.messages_field) if source.format == "chat" else None
                    for message in messages or []:
                        if isinstance(message, dict) and isinstance(message.get("content"), str):
                            message["content"] = redact(message["content"], kinds)
                handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")

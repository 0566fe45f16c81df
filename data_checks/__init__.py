"""dstk's data audit: provenance, leakage and contamination, PII and secrets, record quality.

Importable without torch or DeepSpeed. ``audit(...)`` returns an :class:`AuditReport`; ``dstk audit``
and the training gate are thin layers over it.

The names below are imported on first use (PEP 562), so that ``import data_checks`` stays cheap for
the ``dstk`` CLI and for the audit's worker processes, which need neither ``datasets`` nor pydantic.
"""

from importlib import import_module

__all__ = ["audit", "AuditPolicy", "DataSpec", "AuditReport", "Finding", "AuditInputError"]
_HOMES = {"audit": "data_checks.auditor", "AuditPolicy": "data_checks.policy", "DataSpec": "data_checks.policy",
          "AuditReport": "data_checks.report", "Finding": "data_checks.report",
          "AuditInputError": "data_checks.errors"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'data_checks' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)

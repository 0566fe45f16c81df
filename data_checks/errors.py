"""The one error type for input the audit cannot use."""

from __future__ import annotations


class AuditInputError(Exception):
    """Unusable input: a missing file, malformed JSON, absent fields, a bad manifest or policy.

    The message is one line that names the input, says what is wrong and how to fix it. The CLI
    prints it and exits 2; the training gate stops the same way.
    """

"""The one error type for input the audit cannot use."""

from __future__ import annotations


class AuditInputError(Exception):
    """Unusable input: a missing file, malformed JSON, absent fields, a bad manifest or policy.

    The message is one line that names the input, says what is wrong and how to fix it. The CLI
    prints it and exits 2; the training gate stops the same way.
    """


class MissingField(AuditInputError):
    """A set lacks a field its format reads; says which, and which fields it has, so that a caller
    can name the fix in its own terms (a flag, a recipe key)."""

    def __init__(self, where: str, attr: str, field: str, present: list[str]):
        self.where, self.attr, self.field, self.present = where, attr, field, present
        super().__init__(f"{where}: field {field!r} not found; fields present: {', '.join(present)}: choose "
                         f"the field with --{attr.replace('_', '-')}")

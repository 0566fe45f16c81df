"""What dstk lets through of its libraries' logging: their warnings that concern the user, not
their start-up chatter. ``dstk -v`` (``DSTK_VERBOSE=1``, which dstk's workers inherit) lets all of it
through.

Applied when ``toolkit`` is first imported, before DeepSpeed and bitsandbytes are: both log while
being imported, so the filters must be on their loggers first.
"""

from __future__ import annotations

import logging
import os

VERBOSE_ENV = "DSTK_VERBOSE"

# logger -> the starts of messages that are noise to a dstk user
_NOISE = {
    # Said by DeepSpeed in every process of a machine without CUDA. dstk records the accelerator it
    # trained on in run.json, where it concerns the user.
    "DeepSpeed": ("Setting accelerator to CPU",
                  # dstk reads the learning rate for its first metrics line before the first step
                  "Attempting to get learning rate from scheduler before it has started"),
    # bitsandbytes on an AVX512-BF16 CPU tries to fetch an optional kernel from the Hugging Face hub
    # and, failing, suggests trust_remote_code; its own kernels do the work either way.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}
# logger -> messages said once per process, not at every call
_ONCE = {
    # said by bitsandbytes at every int8 matmul, i.e. per layer and token while scoring or generating
    "bitsandbytes.autograd._functions": ("MatMul8bitLt: inputs will be cast",),
}


class _DropNoise(logging.Filter):
    """Drops messages that start with ``starts``; with ``once``, all but the first of each."""

    def __init__(self, starts: tuple[str, ...], once: bool = False):
        super().__init__()
        self.starts, self.once, self.seen = starts, once, False

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose() or not str(record.msg).startswith(self.starts):
            return True
        first = self.once and not self.seen
        self.seen = True
        return first


def verbose() -> bool:
    """Whether the user asked to see everything (``dstk -v``)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def install() -> None:
    """Filter the libraries' loggers (idempotent)."""
    for once, table in ((False, _NOISE), (True, _ONCE)):
        for name, starts in table.items():
            logger = logging.getLogger(name)
            if not any(isinstance(f, _DropNoise) for f in logger.filters):
                logger.addFilter(_DropNoise(starts, once))

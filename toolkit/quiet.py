"""What dstk lets through of its libraries' logging.

Applied when ``toolkit`` is first imported, before DeepSpeed and bitsandbytes are: both log while
being imported, so the filters must be on their loggers first.
"""

from __future__ import annotations

import logging

# logger -> the starts of messages that are noise to a dstk user
_NOISE = {
    # Said by DeepSpeed in every process of a machine without CUDA. dstk records the accelerator it
    # trained on in run.json, where it concerns the user.
    "DeepSpeed": ("Setting accelerator to CPU",),
    # bitsandbytes on an AVX512-BF16 CPU tries to fetch an optional kernel from the Hugging Face hub
    # and, failing, suggests trust_remote_code; its own kernels do the work either way.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}


class _DropNoise(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def install() -> None:
    """Filter the libraries' loggers (idempotent)."""
    for name, starts in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(starts))

"""Keep freed host memory inside the process while training on the CPU.

glibc's malloc serves large blocks (from 128 KiB, a bound it raises as blocks are freed) with
``mmap`` and hands them back to the kernel on ``free``, and trims the top of its heap likewise. A
training step frees and reallocates the same large tensors every step (activations, gradients,
DeepSpeed's buffers), so every step faults them back in page by page, and in a virtual machine a
page fault costs microseconds.

Serving blocks up to 32 MiB (glibc's own ceiling for that bound) from the heap, and trimming the
heap only past 1 GiB, keeps their pages mapped for reuse, for a higher peak: a heap keeps its
high-water mark. A larger bound (every block below 1 GiB) fragmented the heap for no speed. The
figures are in the README (Packing and throughput). On a GPU the large buffers live in the device's
caching allocator, so this is applied only without one; elsewhere than glibc (musl, macOS) it does
nothing.

Blocks past that bound still come and go with ``mmap``; the largest a step allocates afresh are
DeepSpeed's ZeRO gradient buffers, which :func:`keep_zero_buffers` hands back to it step after step.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_FROM_HEAP = 32 * 2**20  # blocks up to this size come from the heap
_TRIM_PAST = 2**30  # free memory at the top of the heap is returned past this much


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory mapped for reuse; True if it took both settings."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _FROM_HEAP)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_PAST))


def keep_zero_buffers(optimizer) -> bool:
    """Give DeepSpeed's ZeRO-1/2 optimizer the same gradient buffers at every step where it
    accumulates 16-bit gradients in an fp32 partition (the ZeRO-2 template in bf16); True if it has them.

    It allocates its reduction bucket (``reduce_bucket_size`` elements) and the rank's fp32 gradient
    partition afresh at every step and frees them after it: blocks past glibc's 32 MiB heap bound,
    which come from ``mmap`` and fault in page by page every step. The bucket's contents are
    overwritten before they are read, and the partition is zeroed here, as a fresh one would be.
    In fp32 DeepSpeed keeps no such partition, and keeping the bucket alone (5e7 fp32 elements)
    raised the peak more than it saved: those runs, like other optimizers (ZeRO-3, DeepSpeed's bf16
    optimizer, other versions), are left as they are.
    """
    setup, build, compact = (getattr(optimizer, name, None) for name in (
        "setup_buckets", "_build_compact_grad_partition_buffer", "_use_compact_grad_partition_buffer"))
    if None in (setup, build, compact) or not hasattr(optimizer, "ipg_buckets") or not compact(0):
        return False
    buckets: dict = {}
    partitions: dict = {}

    def setup_kept_buckets():
        setup()  # its fresh buffers are untouched, so dropping them costs no page
        for dtype, bucket in optimizer.ipg_buckets.items():
            kept = buckets.setdefault(dtype, list(bucket.buffer))
            if [(b.shape, b.dtype) for b in kept] == [(b.shape, b.dtype) for b in bucket.buffer]:
                bucket.buffer[:] = kept
            else:
                buckets[dtype] = list(bucket.buffer)

    def kept_partition(group_idx):
        group = partitions.get(group_idx)
        if group is None:
            group = partitions[group_idx] = build(group_idx)
        else:
            group.flat_partition.zero_()
        return group

    optimizer.setup_buckets = setup_kept_buckets
    optimizer._build_compact_grad_partition_buffer = kept_partition
    return True

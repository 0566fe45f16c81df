"""Training on the CPU keeps freed memory mapped: large blocks come from the heap, and a reallocated
buffer costs no page faults."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.multirank import ROOT, run_deepspeed

WORKER = Path(__file__).parent / "workers" / "zero_buffers.py"

# A fresh process: this one's malloc settings are left as pytest found them. glibc's mallinfo2
# says how many bytes are mapped for single blocks (hblkhd). As glibc comes, a 24 MiB block is
# mapped for itself and unmapped when freed, so each reallocation faults all of its pages back
# in. After keep_freed_memory() a 28 MiB block (larger than any freed before, which glibc's own
# adaptive bound would not cover) comes from the heap, and once the heap has grown to hold it,
# reallocating it faults nothing. The heap settles within the first few reallocations (measured:
# it grows for one of the first four, then never, in 12 runs of 10): where a block lands in it
# depends on the randomised heap start and the alignment torch asks for. The process first loads
# transformers, as a training process has before it keeps freed memory: in a bare torch process the
# heap is small, and one of the reallocations after settling still faulted in 3 runs of 6.
SCRIPT = """
import ctypes, resource, torch
import toolkit.models.loading
from toolkit.training.host_memory import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
mapped = lambda: libc.mallinfo2().hblkhd

def fill(mib):
    return torch.empty(mib * 2**18).fill_(1)

start = mapped()
block = fill(24)
default_mapped = mapped() - start
del block
unmapped = mapped() == start
kept = keep_freed_memory()
block = fill(28)
kept_mapped = mapped() - start
del block
for _ in range(5):
    fill(28)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    fill(28)
print(default_mapped, unmapped, kept, kept_mapped, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_large_blocks_come_from_the_heap_and_are_not_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, check=True)
    default_mapped, unmapped, kept, kept_mapped, faults = out.stdout.split()
    assert int(default_mapped) >= 24 * 2**20 and unmapped == "True"  # glibc as it comes
    assert kept == "True" and int(kept_mapped) == 0
    # 3 x 28 MiB is 21,504 pages of 4 KiB
    assert int(faults) < 100


def test_zero_gradient_buffers_kept_across_steps_train_the_same_weights():
    """ZeRO-2, bf16, fp32 gradient accumulation over 2 micro-batches, 3 steps on 2 ranks: DeepSpeed's
    reduction bucket and fp32 gradient partition are the same tensors at every step, and the weights
    are those of DeepSpeed's fresh buffers bit for bit (a kept partition not zeroed would carry the
    last step's gradient into the next)."""
    for rank in run_deepspeed(WORKER):
        assert rank["kept"] and rank["moved"] and rank["same_weights"]
        assert rank["distinct_buffers"] == 2  # one bucket, one partition, over all steps

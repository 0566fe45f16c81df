"""Training on the CPU keeps freed memory mapped: a reallocated buffer costs no page faults."""

import subprocess
import sys

import pytest

from tests.multirank import ROOT

# A fresh process: this one's malloc settings are left as pytest found them. A 16 MiB buffer is
# filled, freed and allocated again three times; the minor page faults of those three are printed
# before and after keep_freed_memory().
SCRIPT = """
import resource, torch
from toolkit.host_memory import keep_freed_memory

def faults():
    torch.empty(2**22).fill_(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        torch.empty(2**22).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

print(faults(), keep_freed_memory(), faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_reallocated_buffer_is_not_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, check=True)
    before, applied, after = out.stdout.split()
    assert applied == "True"
    # 3 x 16 MiB is 12,288 pages of 4 KiB; glibc hands the buffer back to the kernel each time
    assert int(before) > 3000
    assert int(after) < 100

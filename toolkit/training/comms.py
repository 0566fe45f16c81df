"""How much of a step goes to communication, from DeepSpeed's comms logger.

While DeepSpeed's comms logger is on, every collective and point-to-point op its engines issue
through ``deepspeed.comm`` is timed under the op's name. It is on only for the steps dstk logs:
the logger makes each op blocking (it synchronises the device after every op), which on a GPU
would cost the overlap of communication with compute on every step. Three things about it
(DeepSpeed 0.19.8) shape how it is read here:

* an op's timer accumulates until it is reset (the logger appends the running total at each
  call), so a step's time is each op's timer, read and reset after the step;
* an op issued with ``async_op=True`` is timed until it is issued, not until it completes. ZeRO-3
  gathers its parameters that way, so the waits on DeepSpeed's gather handles are timed as well;
* a DeepSpeed config that turns the logger on itself keeps it, untouched, for its own summary,
  and dstk then reports no communication share.

What is counted is time a rank spends inside communication, waits for slower ranks included: in a
pipeline, a stage blocked on its neighbour's activations counts, so the bubble shows up here.
The collectives dstk issues itself for logging (torch.distributed directly) are not counted.
"""

from __future__ import annotations

import functools
import time

_waited_s = [0.0]  # time in the wrapped gather waits since the clock was started


def _timed_wait(wait):
    @functools.wraps(wait)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return wait(*args, **kwargs)
        finally:
            _waited_s[0] += time.perf_counter() - start

    timed.dstk_timed = True
    return timed


def _time_gather_waits() -> None:
    from deepspeed.runtime.zero import partition_parameters as zero3

    for handle in (zero3.AllGatherHandle, zero3.AllGatherCoalescedHandle):
        if not getattr(handle.wait, "dstk_timed", False):
            handle.wait = _timed_wait(handle.wait)


class CommClock:
    """Seconds this rank spends communicating between :meth:`start` and :meth:`stop`."""

    def __init__(self):
        from deepspeed.comm import comm

        self._comm = comm
        self.available = not comm.comms_logger.enabled  # else the user's config owns it
        if self.available:
            _time_gather_waits()

    def start(self) -> None:
        if self.available:
            logger = self._comm.comms_logger
            logger.reset_data()
            for name in list(self._comm.timers.get_timers()):
                self._comm.timers(name).reset()
            logger.enabled, logger.prof_all = True, True
            _waited_s[0] = 0.0

    def stop(self) -> float | None:
        """Seconds spent in communication since :meth:`start` (None when not measured)."""
        if not self.available:
            return None
        logger = self._comm.comms_logger
        logger.enabled = False
        total_ms = sum(self._comm.timers(name).elapsed(reset=True) for name in logger.comms_dict)
        logger.reset_data()
        return total_ms / 1000 + _waited_s[0]

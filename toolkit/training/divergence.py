"""The divergence guard: a NaN/inf loss, or a loss spike, stops the run or is skipped over.

Checked on the losses the loop syncs anyway (logging and checkpoint steps), so it adds no host
synchronisation. ``skip`` reloads the last complete checkpoint in place and drops the batches
since the last good check, the recovery large runs use for loss spikes (PaLM, section 5.1):
replaying them would diverge again, since batches are a pure function of the step.
"""

from __future__ import annotations

import math
import statistics

from toolkit.errors import UserError


class Diverged(UserError):
    """The loss diverged and the run stopped; ``latest`` is the last checkpoint saved before it."""

    exit_code = 3


class DivergenceGuard:
    """Judges each synced loss against NaN/inf and, with ``spike_factor``, the recent median."""

    def __init__(self, spike_factor: float = 0.0, window: int = 10):
        self.spike_factor, self.window = spike_factor, window
        self.history: list[float] = []

    def check(self, loss: float) -> str | None:
        """Why ``loss`` counts as a divergence (``"nan"``, ``"inf"``, ``"spike"``), or None.

        Good losses join the history; bad ones do not, so a spike does not raise the bar.
        """
        if math.isnan(loss):
            return "nan"
        if math.isinf(loss):
            return "inf"
        recent = self.history[-self.window:]
        if self.spike_factor and len(recent) == self.window and loss > self.spike_factor * statistics.median(recent):
            return "spike"
        self.history.append(loss)
        return None

"""How long the device sat idle between training steps in a logging interval: ``perf/data_wait_frac``.

On a GPU the host only queues work, so the time the training loop spends blocked on the data stream says little:
the GPU may still be busy with queued steps (no loss), or starve while the host does something else. What costs
throughput is the device having nothing queued. CUDA events recorded on the compute stream at each step's start and
end (no sync: ``record`` is asynchronous) give exactly that: the gaps between one step's end and the next step's
start, in device time. They are read at the logging interval, after the logger's one device->host copy has waited
for the stream anyway. On a CPU the step runs synchronously, so the host's blocked time *is* the idle time.
"""
from __future__ import annotations

import torch


class IdleClock:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._anchor = None            # interval start (an event recorded at restart)
        self._marks: list[tuple] = []  # (begin event or None, end event) per step

    def _event(self):
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def restart(self) -> None:
        """A new interval starts now (after a flush, an evaluation, a checkpoint)."""
        self._marks = []
        self._anchor = self._event() if self.cuda else None

    def begin(self) -> None:
        if self.cuda:
            self._marks.append((self._event(), None))

    def end(self) -> None:
        if not self.cuda:
            return
        begin = self._marks.pop()[0] if self._marks and self._marks[-1][1] is None else None
        self._marks.append((begin, self._event()))

    def idle_fraction(self, *, host_wait_s: float, wall_s: float) -> float:
        """Device idle time / interval time. Call after the device has caught up (the logger's drain syncs)."""
        if not self.cuda:
            return min(1.0, host_wait_s / max(wall_s, 1e-9))
        marks = [m for m in self._marks if m[1] is not None]
        if not marks:
            return 0.0
        anchor = self._anchor if self._anchor is not None else (marks[0][0] or marks[0][1])
        idle, prev_end = 0.0, anchor
        for begin, end in marks:
            if begin is not None:  # a step whose start was not marked counts as busy from the previous end
                idle += max(0.0, prev_end.elapsed_time(begin))
            prev_end = end
        span = anchor.elapsed_time(marks[-1][1])
        return min(1.0, idle / span) if span > 0 else 0.0

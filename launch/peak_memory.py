"""Peak memory of this process, for the benchmarks (one mode / config per process)."""
from __future__ import annotations


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM, Linux). Not ``ru_maxrss``: Linux carries the parent's peak across
    fork + exec, so a child would report its parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024

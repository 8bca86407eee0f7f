"""Thread-count default shared by the trainer (``train_scripts``) and the ``timm-spot`` command.

Lives in the installed package so both pick threads the same way: on a machine whose other cores are busy,
oversubscribed OpenMP threads wait on each other (the README's probe took 166 s with 2 threads on a 2-core machine
with one busy core, 26 s with 1).
"""
import os

__all__ = ['default_threads']


def default_threads(processes_here: int = 1) -> int:
    """Torch threads per process when none is asked for: the idle cores (cores minus the 1-minute load average,
    at least 1) shared by this machine's processes. Never more threads than free cores: oversubscribed OpenMP
    threads wait on each other."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):  # pragma: no cover
        busy = 0.0
    idle = max(1, int(round(cores - busy)))
    return max(1, min(cores // max(1, processes_here), idle))

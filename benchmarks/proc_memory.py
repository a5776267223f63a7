"""Resident memory of this process from /proc (Linux): what the memory benchmarks compare."""

from __future__ import annotations

from pathlib import Path


def status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now; VmHWM: the high-water mark)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    """Start the high-water mark afresh from the resident memory now (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")

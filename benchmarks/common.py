"""Helpers shared by the benchmark scripts (run as `python benchmarks/X.py`, so importable by name)."""

from __future__ import annotations


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: Linux keeps that across exec,
    so a child would report its parent's peak."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


"""Process memory readings (Linux /proc): the peak resident set size, and restarting its count."""

from __future__ import annotations

from pathlib import Path


def peak_rss_mb() -> float | None:
    """VmHWM, the process's peak resident memory in MB; None where /proc does not tell."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Restart the peak count from the current RSS (Linux clear_refs); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False

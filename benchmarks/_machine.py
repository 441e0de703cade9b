"""How busy the machine is: printed in every benchmark header, since other
processes on a small machine distort timings."""

from __future__ import annotations

import os
import time
from typing import Optional


def busy(seconds: float = 0.5) -> Optional[float]:
    """Fraction of all CPUs busy over ``seconds`` while this process sleeps (Linux ``/proc/stat``)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def proc_status_kib(key: str) -> Optional[int]:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def load_report() -> str:
    """The header lines on the machine's load: the load average, the share of the CPUs
    other processes kept busy, and a warning above 20 % (absolute times are then inflated)."""
    share = busy()
    text = f"load average at start {load_average()}"
    if share is None:
        return text
    text += f"; CPU busy with other work before the run: {100 * share:.0f}%"
    if share > 0.2:
        text += (f"\n\n**Warning: other processes kept {100 * share:.0f}% of the CPUs busy before the run; "
                 "absolute times are inflated, compare the ratios.**")
    return text


def platform_line(device: str = "cpu") -> str:
    """The header line on the run: date, torch, float64, processor, CPUs (and GPU), python, threads."""
    import datetime
    import platform

    import torch

    gpu = f"; {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return (f"{datetime.datetime.now().isoformat(timespec='seconds')}; torch {torch.__version__}, float64; "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{gpu}; "
            f"python {platform.python_version()}; {torch.get_num_threads()} torch threads")

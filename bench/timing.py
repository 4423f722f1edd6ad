"""Timers, the copy-bandwidth roofline and machine facts for the benchmark CLI.

CPU: wall clock (time.perf_counter) around each call; every op here is synchronous on the CPU.
CUDA: triton.testing.do_bench when Triton is importable (it flushes L2 between calls), else CUDA events. All report
milliseconds as a list of samples, so that the caller can interleave backends call by call and take medians.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch

Timer = Callable[[Callable[[], object], int], list[float]]  # timer(fn, n) -> samples in ms


def cpu_times_ms(fn: Callable[[], object], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def cuda_event_times_ms(fn: Callable[[], object], n: int) -> list[float]:
    torch.cuda.synchronize()  # do not charge this call for work queued before it
    samples = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return samples


def make_timer(device: torch.device) -> tuple[Timer, str]:
    """(timer, its description) for `device`. do_bench repeats internally and returns one median per call."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return cuda_event_times_ms, "CUDA events"

        def do_bench_median(fn: Callable[[], object], n: int) -> list[float]:
            ms = do_bench(fn, quantiles=[0.5])  # quantiles: accepted by every Triton release, unlike return_mode
            return [float(ms[0] if isinstance(ms, (list, tuple)) else ms)]

        return do_bench_median, "triton.testing.do_bench (median)"
    return cpu_times_ms, "time.perf_counter"


def warm_up(fn: Callable[[], object], n: int, device: torch.device) -> None:
    for _ in range(n):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, timer: Timer, numel: int = 1 << 26, repeat: int = 10) -> float:
    """Bytes per second of dst.copy_(src) on a large fp32 buffer, counting read + write (all threads).

    Best of `repeat`, not the median: a roofline is what the hardware can do, and on a shared machine a slow sample
    only says that someone else was using the cores.
    """
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)

    warm_up(copy, 2, device)
    seconds = min(timer(copy, repeat)) * 1e-3
    return 2 * numel * src.element_size() / seconds


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    return {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "threads": torch.get_num_threads(), "device": str(device), "device_name": device_name(device)}

"""GPUs as NVML sees them (nvidia-ml-py): how many, how busy, how much memory in use.

A machine without the NVIDIA driver has no NVML library; that is a normal answer here
(zero GPUs, with the reason kept for the log), never an error."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import pynvml

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Sample:
    index: int
    utilization: float
    """Share of the last sample period the GPU was busy, 0-1."""
    memory_used: int
    memory_total: int


class Gpus:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason = ""
        try:
            pynvml.nvmlInit()
            self.count = int(pynvml.nvmlDeviceGetCount())
        except pynvml.NVMLError as exc:
            self.count = 0
            self.reason = str(exc)
            log.info("no GPU: %s", exc)

    def sample(self) -> list[Sample]:
        out = []
        with self._lock:
            for index in range(self.count):
                try:
                    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                    rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
                    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                except pynvml.NVMLError as exc:
                    # A GPU that fell off the bus says so once per scrape, not as a crash.
                    log.warning("GPU %d cannot be read: %s", index, exc)
                    continue
                out.append(
                    Sample(
                        index=index,
                        utilization=float(rates.gpu) / 100.0,
                        memory_used=int(memory.used),
                        memory_total=int(memory.total),
                    )
                )
        return out

    def close(self) -> None:
        if self.count:
            pynvml.nvmlShutdown()

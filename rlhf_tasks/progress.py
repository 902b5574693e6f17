"""Progress for long work: a bar in a terminal, a periodic log line otherwise (Airflow logs)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("rlhf.progress")


class Progress:
    def __init__(self, total: int, desc: str, every_s: float = 10.0):
        self.total, self.desc, self.every_s = total, desc, every_s
        self.done, self.started = 0, time.perf_counter()
        self.last = self.started
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False)

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if info:
                self.bar.set_postfix(info, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            extra = " ".join(f"{k}={v}" for k, v in info.items())
            log.info("%s: %d/%d (%.1f/s) %s", self.desc, self.done, self.total, rate, extra)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

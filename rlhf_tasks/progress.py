"""Progress for long work: a bar in a terminal, a periodic log line otherwise (Airflow
logs): ``<what>: <done>/<total> (<rate>/s, ETA <time>) <extra>``, every
``$RLHF_PROGRESS_SECONDS`` (default 10) and when the work is done."""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("rlhf.progress")


def eta_text(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
    def __init__(self, total: int, desc: str, every_s: float | None = None, unit: str = ""):
        self.total, self.desc, self.unit = total, desc, unit
        self.every_s = (every_s if every_s is not None
                        else float(os.environ.get("RLHF_PROGRESS_SECONDS", "10")))
        self.done, self.started = 0, time.perf_counter()
        self.last = self.started
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, leave=False)

    def line(self, now: float, info: dict) -> str:
        rate = self.done / max(now - self.started, 1e-9)
        eta = eta_text((self.total - self.done) / rate) if rate > 0 else "?"
        extra = " ".join(f"{k}={v}" for k, v in info.items())
        unit = f" {self.unit}" if self.unit else ""
        return (f"{self.desc}: {self.done}/{self.total}{unit} ({rate:.2f}/s, ETA {eta})"
                + (f" {extra}" if extra else ""))

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if info:
                self.bar.set_postfix(info, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            log.info("%s", self.line(now, info))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""Progress of a sweep: a live rich display on a terminal, plain log lines otherwise (CI logs)."""

from __future__ import annotations

import sys
import time


class Progress:
    """Receives sweep events; prints plain lines. ``LiveProgress`` draws them on a terminal."""

    def __init__(self, total_units: int, prefix: str = ""):
        self.total, self.done, self.prefix = total_units, 0, prefix
        self.started = time.monotonic()
        self.study = ""

    def _eta(self) -> str:
        if self.done == 0:
            return "?"
        left = (time.monotonic() - self.started) / self.done * max(self.total - self.done, 0)
        return f"{int(left // 60)}m{int(left % 60):02d}s"

    def log(self, text: str) -> None:
        print(f"{self.prefix}{text}", flush=True)

    def study_started(self, name: str, index: int, count: int) -> None:
        self.study = name

    def trial_started(self, study: str, stage: str, number: int, label: str) -> None:
        self.log(f"[{self.done}/{self.total} eta {self._eta()}] {study} {stage} {label}")

    def epoch_ended(self, epoch: int, epochs: int, metric: str, value: float) -> None:
        self.log(f"    epoch {epoch}/{epochs} valid {metric}={value:.4g}")

    def trial_ended(self, state: str, detail: str = "") -> None:
        self.done += 1
        self.log(f"    -> {state}{(': ' + detail) if detail else ''}")

    def close(self) -> None:
        pass


class LiveProgress(Progress):
    def __init__(self, total_units: int, prefix: str = ""):
        super().__init__(total_units, prefix)
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        self._bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
        )
        self._task = self._bar.add_task("runs", total=total_units, status="")
        self._bar.start()

    def log(self, text: str) -> None:
        self._bar.console.print(text)

    def trial_started(self, study: str, stage: str, number: int, label: str) -> None:
        self._bar.update(self._task, description=study, status=f"{stage} {label}")

    def epoch_ended(self, epoch: int, epochs: int, metric: str, value: float) -> None:
        status = self._bar.tasks[0].fields["status"].split(" | ")[0]
        self._bar.update(self._task, status=f"{status} | epoch {epoch}/{epochs} {metric}={value:.4g}")

    def trial_ended(self, state: str, detail: str = "") -> None:
        self.done += 1
        self._bar.advance(self._task)
        if state not in ("complete",):
            self.log(f"{self.study}: {state}{(': ' + detail) if detail else ''}")

    def close(self) -> None:
        self._bar.stop()


def make_progress(total_units: int, prefix: str = "") -> Progress:
    return (
        LiveProgress(total_units, prefix)
        if sys.stdout.isatty() and not prefix
        else Progress(total_units, prefix)
    )

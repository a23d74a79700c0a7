"""What a run reports: `say` (the one way to print progress: rank 0 only under torchrun) and
`MetricsLog`, the append-only `metrics.jsonl` that is the source of truth of every run, with optional
sinks (an experiment tracker) that receive the same records.

Every record is one JSON object per line with `event` and `time`; the trainer writes `start`,
`scale`, `step` (every LOG_EVERY batches: loss, learning rate, the task's loss terms), `epoch`
(train statistics and dev metrics), `resume`, `stopped`, `early_stop` and `done`.  A kill during an
append leaves at most a torn last line, which `records()` skips.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Protocol

from common.io import append_jsonl, read_jsonl_log


def _is_main() -> bool:
    from training.distributed import is_main

    return is_main()


def say(*parts, all_ranks: bool = False) -> None:
    """Print a progress line (on rank 0 only unless `all_ranks`), flushed at once."""
    if all_ranks or _is_main():
        print(*parts, flush=True)


class LogSink(Protocol):
    """Receives every record written to a run's metrics log (e.g. a TensorBoard writer)."""

    def write(self, event: str, record: dict) -> None: ...

    def close(self) -> None: ...


class MetricsLog:
    """Append-only JSON-lines log, one record per event (rank 0 writes), mirrored to `sinks`."""

    def __init__(self, path: str | Path, sinks: Iterable[LogSink] = ()):
        self.path = Path(path)
        self.sinks = list(sinks)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **record) -> None:
        if not _is_main():
            return
        full = {"event": event, "time": round(time.time(), 3), **record}
        append_jsonl(self.path, full)
        for sink in self.sinks:
            sink.write(event, full)

    def records(self, event: str | None = None) -> list[dict]:
        """The log's records (all, or those of one event), a torn last line skipped."""
        return [r for r in read_jsonl_log(self.path) if event is None or r.get("event") == event]

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

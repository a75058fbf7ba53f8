"""What a run did: counts by outcome, failures grouped by reason, the exit code.

Exit codes are part of the contract scripts rely on:
0 all indexed or skipped, 1 finished with failures, 2 config or usage error,
3 the run could not go on, 130 after SIGINT and 143 after SIGTERM (drained, saved).
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_FATAL", "EXIT_OK", "RunOutcome"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_FATAL = 3
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}
_EXAMPLES_PER_REASON = 5
_SLOWEST_KEPT = 10


@dataclass(slots=True)
class RunOutcome:
    """Counts of one run; every discovered document lands in exactly one outcome."""

    discovered: int = 0
    indexed: int = 0
    failed: int = 0
    skipped: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicates: int = 0
    previously_failed: int = 0
    removed: int = 0
    interrupted: int = 0  # in flight when the run stopped: pending, resumed next run
    deferred: int = 0  # modified too recently to read (watch mode): a later pass takes them
    low_disk: bool = False  # stopped because free space ran short
    chunks: int = 0
    pages: int = 0
    retry_reasons: Counter[str] = field(default_factory=Counter)  # "stage: reason" -> n
    slowest: list[tuple[float, str]] = field(default_factory=list)  # a min-heap, bounded
    failure_reasons: Counter[str] = field(default_factory=Counter)
    failure_examples: dict[str, list[str]] = field(default_factory=dict)
    stopped_by: str | None = None  # "SIGINT" / "SIGTERM"
    fatal: str | None = None
    config_error: bool = False  # the fatal error is a config mistake found on opening
    walk_complete: bool = False
    walk_errors: int = 0  # folders that could not be read: no pruning after such a walk
    notes: list[str] = field(default_factory=list)  # said once at the end, by stages
    cpu_busy: float | None = None  # share of the machine's CPUs busy during the run
    seconds: float = 0.0

    def record_failure(self, path: str, *, stage: str, reason: str, message: str) -> None:
        self.failed += 1
        key = f"{stage}: {reason}"
        self.failure_reasons[key] += 1
        examples = self.failure_examples.setdefault(key, [])
        if len(examples) < _EXAMPLES_PER_REASON:
            examples.append(f"{path}: {message}")

    def record_time(self, path: str, seconds: float) -> None:
        """Keep the slowest documents only: memory stays bounded on any corpus."""
        if len(self.slowest) < _SLOWEST_KEPT:
            heapq.heappush(self.slowest, (seconds, path))
        elif seconds > self.slowest[0][0]:
            heapq.heapreplace(self.slowest, (seconds, path))

    @property
    def exit_code(self) -> int:
        if self.fatal is not None:
            return EXIT_CONFIG if self.config_error else EXIT_FATAL
        if self.stopped_by is not None:
            return EXIT_SIGNAL.get(self.stopped_by, EXIT_FAILED)
        return EXIT_FAILED if self.failed else EXIT_OK

    @property
    def outcome(self) -> str:
        if self.fatal is not None:
            return "fatal"
        if self.stopped_by is not None:
            return "interrupted"
        return "failures" if self.failed else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "exit_code": self.exit_code,
            "discovered": self.discovered,
            "indexed": self.indexed,
            "failed": self.failed,
            "skipped": self.skipped,
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "duplicates": self.duplicates,
            "previously_failed": self.previously_failed,
            "removed": self.removed,
            "interrupted": self.interrupted,
            "deferred": self.deferred,
            "chunks": self.chunks,
            "pages": self.pages,
            "retries_by_reason": dict(self.retry_reasons),
            "slowest_documents": [
                {"path": path, "seconds": round(sec, 3)} for sec, path in sorted(self.slowest)[::-1]
            ],
            "failures_by_reason": dict(self.failure_reasons),
            "failure_examples": self.failure_examples,
            "stopped_by": self.stopped_by,
            "fatal": self.fatal,
            "notes": self.notes,
            "cpu_busy": None if self.cpu_busy is None else round(self.cpu_busy, 3),
            "seconds": round(self.seconds, 3),
        }

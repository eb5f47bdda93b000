"""How long a command may wait on an object store that does not answer.

The rule. A command (one ``kubeseg`` verb, one pipeline step: one process) counts, for each S3
endpoint, the time it has spent waiting on that endpoint since the endpoint last answered:

- waiting is the time from the start of a request until its response (status line and
  headers) arrives, and the backoff pauses between retries; while several requests wait at
  once, wall-clock time is counted once;
- any answer (any status, errors included) sets the count back to zero;
- when the count reaches the command's deadline (``KUBESEG_S3_TIMEOUT``, ``--s3-timeout``)
  no new request starts, and a request's connect and read timeouts are cut to what is left
  of the deadline when it starts, so an endpoint that accepts connections and never answers,
  or one that cannot be reached, fails the command once, at the deadline, however many
  storage calls the command would have made;
- a transfer is bounded by the read timeout only: the longest pause between two packets,
  sending (a body goes out in blocks) or receiving. A response whose body is arriving is not
  waiting, and a request's answer comes right after its last bytes are through, so a large
  transfer that keeps moving finishes however long it takes, over however slow a link.

Time spent computing between storage calls is never counted. The count lives in a scope
(:func:`command_deadline`): the CLI opens one per verb; outside any scope one process-wide
scope applies, which is what a pipeline step gets. A forked process (a DataLoader worker)
starts counting afresh.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator, Optional


class SilenceWatch:
    """The waiting time on one endpoint since it last answered (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting = 0  # requests (and retry pauses) now waiting for an answer
        self._silent_s = 0.0  # waiting time of earlier stretches since the last answer
        self._since = 0.0  # start of the current stretch (while _waiting > 0)

    def silence(self) -> float:
        """Seconds waited since the endpoint last answered."""
        with self._lock:
            current = time.monotonic() - self._since if self._waiting else 0.0
            return self._silent_s + current

    def begin(self) -> None:
        """A request (or a retry pause) starts waiting."""
        with self._lock:
            if self._waiting == 0:
                self._since = time.monotonic()
            self._waiting += 1

    def end(self, answered: bool) -> None:
        """The request that :meth:`begin` counted got an answer, or gave up without one."""
        with self._lock:
            now = time.monotonic()
            if answered:
                self._silent_s, self._since = 0.0, now
            self._waiting -= 1
            if self._waiting == 0:
                self._silent_s += now - self._since

    @contextmanager
    def unanswered(self) -> Iterator[None]:
        """A stretch of waiting that gets no answer (a pause before a retry)."""
        self.begin()
        try:
            yield
        finally:
            self.end(answered=False)


class CommandDeadline:
    """One command's deadline: a silence watch per endpoint and, when given, a deadline that
    replaces the one in the storage settings (``--s3-timeout``)."""

    def __init__(self, timeout_s: Optional[float] = None) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._watches: Dict[str, SilenceWatch] = {}

    def watch(self, endpoint: str) -> SilenceWatch:
        with self._lock:
            if endpoint not in self._watches:
                self._watches[endpoint] = SilenceWatch()
            return self._watches[endpoint]

    def budget(self, configured_s: float) -> float:
        """The deadline in force: this command's own, else the configured one."""
        return self.timeout_s if self.timeout_s is not None else configured_s


_process_scope = CommandDeadline()
_current = _process_scope


def current() -> CommandDeadline:
    """The scope in force (the innermost :func:`command_deadline`, else the process's)."""
    return _current


@contextmanager
def command_deadline(timeout_s: Optional[float] = None) -> Iterator[CommandDeadline]:
    """Count storage waits of the enclosed work afresh, as one command; ``timeout_s`` (when
    given) replaces ``KUBESEG_S3_TIMEOUT`` for it. Shared by every thread of the process."""
    global _current
    previous, _current = _current, CommandDeadline(timeout_s)
    try:
        yield _current
    finally:
        _current = previous


def _after_fork_in_child() -> None:
    # a lock held by another thread at the fork would never be released in the child
    global _process_scope, _current
    keep_current = _current is not _process_scope
    _process_scope = CommandDeadline()
    _current = CommandDeadline(_current.timeout_s) if keep_current else _process_scope


os.register_at_fork(after_in_child=_after_fork_in_child)

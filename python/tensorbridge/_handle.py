"""Transfer: the handle returned by non-blocking conversions, alone or combined."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# What failed transfers held: after a failed wait the DMA may still be reading or writing
# that memory, so it is never freed (a small leak on a rare error, never a use-after-free).
_PARKED: list[Any] = []
_PARKED_LOCK = threading.Lock()


def park(keepalive: Any) -> None:
    """Keeps ``keepalive`` alive for good: a copy that failed may still touch its memory."""
    if keepalive is not None:
        with _PARKED_LOCK:
            _PARKED.append(keepalive)


class Transfer(Generic[T]):
    """A conversion that may still be in flight.

    ``wait()`` returns the result once it is complete (and raises the transfer's error,
    if any); ``done()`` polls without blocking. Waiting twice returns the same result
    (or raises the same error). A KeyboardInterrupt while waiting leaves the transfer
    pending: a later ``wait()`` finishes it. Until the transfer completes the handle
    keeps its source and destination alive. A handle is neither copied nor pickled (its
    result is: ``wait()`` for it first).

    Example:
        >>> import torch, tensorbridge as tb
        >>> t = tb.to_numpy(torch.arange(3), non_blocking=True)
        >>> t.wait()
        array([0, 1, 2])
    """

    __slots__ = (
        "__weakref__",
        "_block",
        "_error",
        "_keepalive",
        "_lock",
        "_poll",
        "_result",
        "_traceback",
    )

    def __init__(
        self,
        result: T | None = None,
        *,
        error: BaseException | None = None,
        poll: Callable[[], bool] | None = None,
        block: Callable[[], object] | None = None,
        keepalive: Any = None,
    ) -> None:
        self._result = result
        self._error = error
        # (each wait() raises the error from here: re-raising it as it stands would add
        # every waiter's frames to its traceback, and keep them all alive; the latest
        # waiter's stay alive with the error, as with any exception kept)
        self._traceback = error.__traceback__ if error is not None else None
        self._poll = poll  # None: complete
        self._block = block
        self._keepalive = keepalive
        self._lock = threading.Lock()

    @classmethod
    def completed(cls, result: T) -> Transfer[T]:
        """A handle for work that already finished."""
        return cls(result)

    @classmethod
    def failed(cls, error: BaseException) -> Transfer[Any]:
        """A handle whose wait() raises ``error``."""
        return cls(None, error=error)

    @classmethod
    def gather(cls, handles: Sequence[Transfer[Any]], combine: Callable[[], T]) -> Transfer[T]:
        """One handle for several: ``done()`` once every one is done; ``wait()`` returns
        ``combine()``, which waits for each (and raises the first error it meets).

        The way to build a combined handle: no other module writes a handle's fields.
        """
        if all(h.done() for h in handles):
            try:
                return cls.completed(combine())
            except Exception as exc:  # (a handle's error: raised by wait(), as for one)
                return cls.failed(exc)
        t: Transfer[T] = cls(None, poll=lambda: all(h.done() for h in handles))

        def block() -> None:
            t._result = combine()

        t._block = block
        return t

    def done(self) -> bool:
        """True once the result is ready (or the transfer failed); never blocks."""
        # Under the lock, so a concurrent wait() cannot release what poll() looks at;
        # if another thread is inside wait() right now, the answer is "not yet".
        if not self._lock.acquire(blocking=False):
            return False
        try:
            return self._poll is None or bool(self._poll())
        finally:
            self._lock.release()

    def wait(self) -> T:
        """Blocks until the transfer is complete and returns its result."""
        with self._lock:
            if self._poll is not None:
                try:
                    if self._block is not None:
                        self._block()
                    else:
                        while not self._poll():
                            time.sleep(50e-6)
                except Exception as exc:  # (a KeyboardInterrupt leaves it pending)
                    self._error, self._traceback = exc, exc.__traceback__
                    park(self._keepalive)  # the copy may still be running: never free it
                self._poll = self._block = None
                self._keepalive = None
        if self._error is not None:
            raise self._error.with_traceback(self._traceback)
        return self._result  # type: ignore[return-value]

    def __reduce_ex__(self, protocol: object) -> Any:
        raise TypeError(
            "a tensorbridge.Transfer cannot be copied or pickled (it stands for a copy in "
            "flight): copy or pickle its result, transfer.wait()."
        )

    def __repr__(self) -> str:
        state = "done" if self._poll is None else "pending"
        if self._error is not None:
            state = f"failed: {self._error!r}"
        return f"<tensorbridge.Transfer {state}>"

"""A request in flight that a later verdict may end: one way to end it, whichever stage judges it again.

Theory of operation. Two stages keep judging a request after it was admitted, for as long as it is in flight (an
ActiveSync Ping is held at the backend for most of an hour): the revocation watch (`proxy.certs.live`: a refresh's
CRLs revoke its chain, or a reload's trust list no longer builds it) and, wherever one is configured, the directory
(`proxy.held_mapping`: its account disabled, locked out, expired or deleted, its strong mapping removed). Either
ends a request the same way, `HeldRequest.end`:

1. `held_request_ended` is logged with what the judge names (certificate, UPN), the reason, the fix, and whether
   the backend's answer had started;
2. if it had, the device's connection is cut: too late for a 403, and the device must not take a cut-short answer
   for a whole one;
3. the request's task is cancelled, the reason as the cancellation's message (like a timeout: the backend stage
   lets go of its upstream connection);
4. on the way out of the `with` block the request is held in (`__exit__`), the refusal is raised in place of the
   cancellation, so the pipeline answers it as any other refusal (403 with the reason) and logs the request's line;
   unless the answer had started (nobody is left to tell), or the task was cancelled for another reason as well
   (the client went away, the gateway stops: `Task.uncancel` counts the other cancellations), and then the
   cancellation goes on.

And, once the request is ended, `forget` (where the stage gave one) drops what the gateway keeps of its user (the
delegated tickets, a verified password), which would serve the user's next request, from whichever device, without
asking the KDC: that request is decided afresh (docs/hardening.md, "A revoked certificate and its user's tickets").

A subclass says where its held requests are kept (`_hold`, `_let_go`) and what the log names (`_facts`). One
object per held request, held for the request's life: slots, no per-instance dictionary.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Any

import structlog

from proxy.device.request import DeviceRequest
from proxy.errors import GatewayError

# The context of a request nobody judges while it is held: one for all of them (a held long-poll keeps it)
NOT_HELD = contextlib.nullcontext()

log = structlog.get_logger("proxy.held")


class HeldRequest:
    """One request in flight, and how to end it; a context manager for the time it is held (module docstring)."""

    __slots__ = ("_forget", "answer_started", "ended", "request", "task")

    def __init__(
        self, request: DeviceRequest, task: asyncio.Task[Any], forget: Callable[[], None] | None = None
    ) -> None:
        self.request = request
        self.task = task
        self._forget = forget
        self.ended: GatewayError | None = None
        self.answer_started = False

    def end(self, error: GatewayError) -> None:
        """End the request with `error`, then `forget` its user (once: a later verdict changes nothing)."""
        if self.ended is not None:
            return
        self.ended = error
        self.answer_started = self.request.answer_started
        log.warning(
            "held_request_ended",
            **self._facts(),
            reason=error.reason,
            fix=error.hint,
            answer_started=self.answer_started,
        )
        if self.answer_started:
            self.request.abort()  # too late for a 403: cut the connection
        self.task.cancel(msg=error.reason)
        if self._forget is not None:
            self._forget()

    def __enter__(self) -> None:
        self._hold()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._let_go()
        if not isinstance(error, asyncio.CancelledError):
            return  # finished, or failed on its own: the error (if any) goes on
        if self.ended is None or self.answer_started:
            return  # not ours; or the answer had started, the connection is cut and nobody is left to tell
        if self.task.uncancel() > 0:
            return  # cancelled for another reason as well
        raise self.ended from None

    def _hold(self) -> None:
        """Keep this request where its judge finds it."""
        raise NotImplementedError

    def _let_go(self) -> None:
        """The request is over: its judge no longer finds it."""
        raise NotImplementedError

    def _facts(self) -> dict[str, object]:
        """What `held_request_ended` names besides the reason: the certificate, the UPN."""
        raise NotImplementedError

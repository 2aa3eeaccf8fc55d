"""Counting what the lab KDC was asked: the evidence for "no KDC round trip in steady state".

MIT's KDC logs one line per request (`AS_REQ ...` or `TGS_REQ ... <client> for <server>`); for an S4U
request a second line follows naming the extension and the user (`... PROTOCOL-TRANSITION
s4u-client=alice@LAB.TEST` for S4U2Self, `... CONSTRAINED-DELEGATION s4u-client=...` for S4U2Proxy).
`KdcLog` remembers where the log ended when it was made and reads only what came after.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

S4U2SELF = "PROTOCOL-TRANSITION"
S4U2PROXY = "CONSTRAINED-DELEGATION"


@dataclass(frozen=True)
class KdcRequest:
    kind: str  # "AS_REQ" or "TGS_REQ"
    extension: str | None  # S4U2SELF, S4U2PROXY or None
    user: str | None  # the s4u-client of an S4U request


class KdcLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def requests(self) -> list[KdcRequest]:
        """Every request logged since this object was made, oldest first."""
        with self.path.open(errors="replace") as f:
            f.seek(self.offset)
            lines = f.read().splitlines()
        found: list[KdcRequest] = []
        for line in lines:
            for kind in ("AS_REQ", "TGS_REQ"):
                if f"): {kind} " in line:
                    found.append(KdcRequest(kind, None, None))
            for extension in (S4U2SELF, S4U2PROXY):
                if f"... {extension} s4u-client=" in line and found:
                    user = line.split("s4u-client=", 1)[1].split()[0]
                    found[-1] = KdcRequest(found[-1].kind, extension, user)
        return found

    def as_requests_of(self, principal: str) -> int:
        """How many AS exchanges `principal` made since this object was made (MIT logs `... <client> for krbtgt/...`
        on each AS_REQ line, whether it issued a ticket or asked for preauthentication)."""
        with self.path.open(errors="replace") as f:
            f.seek(self.offset)
            lines = f.read().splitlines()
        return sum("): AS_REQ " in line and f" {principal} for krbtgt/" in line for line in lines)

    def count(self) -> Counter[str]:
        """Requests by kind: "AS_REQ", "TGS_REQ", and the S4U extensions among the latter."""
        counts: Counter[str] = Counter()
        for request in self.requests():
            counts[request.kind] += 1
            if request.extension:
                counts[request.extension] += 1
        return counts

    def settled(self, quiet: float = 0.3, timeout: float = 10.0) -> list[KdcRequest]:
        """The requests since the start, once the log has stopped growing for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        size, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            now_size = self.path.stat().st_size
            if now_size != size:
                size, since = now_size, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
            time.sleep(0.05)
        return self.requests()

"""The process's file descriptors, shared out: device connections, backend connections, and a reserve.

Theory of operation
-------------------
Every socket and file the gateway opens takes one of the process's file descriptors, and past its soft
`RLIMIT_NOFILE` every `accept()`, `connect()`, `socket()` and `open()` fails with EMFILE, whoever calls it. A request
a device holds open (an ActiveSync `Ping`) takes two: its device connection and its backend connection. Measured
before this budget (`tests/integration/test_descriptor_budget.py`, 100 users x 5 held requests under `prlimit
--nofile=512`): the device connections alone took every descriptor, `accept()` failed (`accept_failed`), the admin
listener reset its scrapers, the CRL fetches failed, and the KDC calls too, so every user not yet cached got `502`
with a log blaming the gateway's own Kerberos set-up ("Too many open files" in its minor status).

So each worker shares its soft limit out once, at start (`DescriptorBudget.of`):

- `RESERVE` descriptors (a quarter of the limit, where that is less) stay for everything else: the listening
  sockets, the admin listener's connections (64 at most), the KDC calls' sockets (`kerberos.max_in_flight` per
  thread pool), CRL and OCSP fetches, the directory, the files a reload reads;
- half of the rest, at most `listener.max_connections`, is the device connections' (the listener stops accepting at
  that number: further connections wait in the listen backlog, as at `max_connections`);
- the rest is the backend connections', all users and upstreams together (`proxy.backend.client.BackendSockets`):
  at least as many as device connections, so every request a device connection carries finds one. Past it an idle
  connection of the least recently used user is closed to make room; with none idle, the request is refused with
  `503` and `Retry-After` (`backend_connections_exhausted`).

Nothing is configured: the limit is the operator's hard limit (`LimitNOFILE=` in the systemd unit, `ulimit -Hn`, a
container's `nofile`), to which `kcd-proxy run` raises its soft limit at start (`proxy.cli`). A
`listener.max_connections` the limit cannot hold is cut to what it can, and the start says so
(`descriptor_limit_low`, with the limit that would hold it)."""

from __future__ import annotations

import resource
from dataclasses import dataclass

RESERVE = 256  # descriptors kept for what is neither a device nor a backend connection (at most a quarter of the limit)
_CEILING = 1 << 20  # Linux's default fs.nr_open: what an unlimited soft limit allows at most


@dataclass(frozen=True)
class DescriptorBudget:
    """One worker's file descriptors: `limit` (the soft RLIMIT_NOFILE), `reserve` of them for the process's own use,
    `device` for the listener's connections and `backend` for the backend connections."""

    limit: int
    reserve: int
    device: int
    backend: int
    wanted: int  # listener.max_connections, as configured

    @classmethod
    def of(cls, max_connections: int, limit: int | None = None) -> DescriptorBudget:
        """The budget for `max_connections` under `limit` (default: this process's soft RLIMIT_NOFILE)."""
        if limit is None:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            limit = _CEILING if soft == resource.RLIM_INFINITY else min(soft, _CEILING)
        reserve = min(RESERVE, limit // 4)
        usable = limit - reserve
        device = max(1, min(max_connections, usable // 2))
        return cls(limit, reserve, device, max(1, usable - device), max_connections)

    @property
    def cut(self) -> bool:
        """Whether listener.max_connections is more than the limit holds (`device` is then less)."""
        return self.device < self.wanted

    @property
    def needed(self) -> int:
        """The limit that would hold listener.max_connections: each with a backend connection, and the reserve."""
        return 2 * self.wanted + RESERVE

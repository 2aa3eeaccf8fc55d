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

- a reserve stays for everything else (a quarter of the limit, where that is less): `BASE_RESERVE` for what the
  process opens at start (under 64, measured), the admin listener's connections (64 at most), CRL and OCSP fetches,
  the directory, the siblings' sockets and the files a reload reads; and `KDC_CALL_DESCRIPTORS` for each thread that
  may be inside a KDC call (`kdc_threads`: three pools of `kerberos.max_in_flight`, the readiness and directory
  probes' one each). A call holds a socket to the KDC it asks, and one more while that KDC is silent (MIT asks the
  next one after 10 s and keeps the first connection; measured: 20 calls against three silent KDCs held 60 sockets
  after 30 s). At the default 16 that is 256, the fixed reserve this budget started with; it was short past about 55
  threads. A `kerberos.max_in_flight` whose threads alone would take more than a quarter of the limit is refused at
  start (`kdc_reserve_problem`), naming the key and the limit that would hold it. The shares are set once: a reload
  raising `kerberos.max_in_flight` past what the reserve kept at start holds is refused, naming the key and "restart
  to apply" (`reload_reserve_problem`), since the device and backend shares it would come out of are in use;
- `past_cap(sockets)` for the device connections a worker holds past its cap (`proxy.tls.limits`): those accepted at
  the cap and waiting for a slot (each listening socket's accept loop holds one; behind a balancer up to
  `HEADER_WAITS` whose PROXY headers come meanwhile, and one more for each socket past the first, since each loop
  checks that count before it awaits accept()), and as many idle keep-alives closed for them whose slots they took at
  once, their sockets still closing for a loop pass or two; and up to `HEALTH_CHECKS` balancer health checks gone on to
  TLS with no slot. `OVER_CAP` is that for one socket; a listener bound to several addresses (`:8443`, a name with
  several) runs a loop on each. Left out, they came out of the reserve's share, as a limit that "holds"
  max_connections (`descriptor_limit_low`'s figure) did not hold them;
- half of the rest, at most `listener.max_connections`, is the device connections' (the listener stops accepting at
  that number: further connections wait in the listen backlog, as at `max_connections`);
- the rest is the backend connections', all users and upstreams together (`proxy.backend.client.BackendSockets`):
  at least as many as device connections, so every request a device connection carries finds one. Past it an idle
  connection of the least recently used user is closed to make room; with none idle, the request is refused with
  `503` and `Retry-After` (`backend_connections_exhausted`).

Nothing is configured: the limit is the operator's hard limit (`LimitNOFILE=` in the systemd unit, `ulimit -Hn`, a
container's `nofile`), to which `kcd-proxy run` raises its soft limit at start (`raise_open_file_limit`), as does
`kcd-proxy check-config` before it asks `kdc_reserve_problem` what `run` will (`start_problem`). A
`listener.max_connections` the limit cannot hold is cut to what it can, and the start says so
(`descriptor_limit_low`, with the limit that would hold it)."""

from __future__ import annotations

import contextlib
import resource
from dataclasses import dataclass

BASE_RESERVE = 156  # descriptors kept for what is neither a connection nor a KDC call (module docstring)
KDC_CALL_DESCRIPTORS = (
    2  # sockets one thread's KDC call may hold: the KDC it asks, and the next while that one is silent
)
_HEADER_WAITS = _HEALTH_CHECKS = 16  # proxy.tls.limits's, not imported: the command line reads this module first


def past_cap(sockets: int) -> int:
    """Device connections a worker may hold past its cap with `sockets` listening sockets (module docstring): waiting
    for a slot, `HEADER_WAITS` and one accept loop's for each socket (behind a balancer each loop may take one past
    `HEADER_WAITS`; directly, each holds one), as many idle keep-alives closed for them still closing, and the
    `HEALTH_CHECKS`."""
    return 2 * (_HEADER_WAITS + sockets) + _HEALTH_CHECKS


OVER_CAP = past_cap(1)  # a listener on one address
_CEILING = 1 << 20  # Linux's default fs.nr_open: what an unlimited soft limit allows at most


@dataclass(frozen=True)
class DescriptorBudget:
    """One worker's file descriptors: `limit` (the soft RLIMIT_NOFILE), `reserve` of them for the process's own use,
    `device` for the listener's connections (`past_cap` more for those past its cap) and `backend` for the backend
    connections."""

    limit: int
    reserve: int
    device: int
    backend: int
    wanted: int  # listener.max_connections, as configured
    wanted_reserve: int  # the reserve kerberos.max_in_flight asks for, before the quarter of the limit cuts it
    past_cap: int = OVER_CAP  # device connections past the cap (`past_cap`: its listening sockets')

    @classmethod
    def of(
        cls, max_connections: int, max_in_flight: int, limit: int | None = None, *, sockets: int = 1
    ) -> DescriptorBudget:
        """The budget for `max_connections` and `max_in_flight` (`kerberos.max_in_flight`) under `limit` (default:
        this process's soft RLIMIT_NOFILE), the listener on `sockets` listening sockets."""
        if limit is None:
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            limit = _CEILING if soft == resource.RLIM_INFINITY else min(soft, _CEILING)
        wanted = reserve_for(max_in_flight)
        reserve = min(wanted, limit // 4)
        over = past_cap(sockets)
        usable = limit - reserve - over
        device = max(1, min(max_connections, usable // 2))
        return cls(limit, reserve, device, max(1, usable - device), max_connections, wanted, over)

    @property
    def cut(self) -> bool:
        """Whether listener.max_connections is more than the limit holds (`device` is then less)."""
        return self.device < self.wanted

    @property
    def needed(self) -> int:
        """The limit that would hold listener.max_connections: each with a backend connection, those past the cap, and
        the reserve."""
        return 2 * self.wanted + self.past_cap + self.wanted_reserve


def raise_open_file_limit() -> None:
    """The soft open-file limit raised to the hard one (a process's workers inherit it), as Go's runtime and nginx's
    `worker_rlimit_nofile` do: a shell's soft 1,024 (systemd's default for services too, hard 524,288) would share
    out 367 device connections where the operator's hard limit allows far more. The hard limit stays the operator's
    (`LimitNOFILE=`, `ulimit -Hn`, a container's `nofile`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # a hard limit the kernel will not give (past fs.nr_open)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_problem(max_in_flight: int) -> str | None:
    """Why `kcd-proxy run` under this process's limits would refuse `kerberos.max_in_flight` at its start
    (`kdc_reserve_problem` on the limit it raises its soft limit to), or None; for `kcd-proxy check-config`."""
    raise_open_file_limit()
    return kdc_reserve_problem(max_in_flight, DescriptorBudget.of(0, max_in_flight).limit)


def judged_limit(command: str) -> str:
    """What `start_problem` judged under, for check-config's line: this process's hard open-file limit (a shell's
    `ulimit -Hn`), which is not the service's (`LimitNOFILE=` in its unit, a container's `nofile`), and how to run
    `command` (the check as typed) under the service's limit instead."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    return (
        f"judged under this process's open-file limit ({shown}, ulimit -Hn here), not the service's: to judge under "
        f"the service's, run it with that limit, N its unit's LimitNOFILE= (65536 in deploy/systemd/kcd-proxy.service) "
        f"or the container's nofile: prlimit --nofile=N:N {command} (as root), or systemd-run --pipe --wait "
        f"-p LimitNOFILE=N {command}"
    )


def kdc_threads(max_in_flight: int) -> int:
    """The threads that may be inside a KDC call at once: the delegations' pool, Basic's password checks and its
    tokens (`kerberos.max_in_flight` each), and the readiness and directory probes' thread each."""
    return 3 * max_in_flight + 2


def reserve_for(max_in_flight: int) -> int:
    """The reserve a worker keeps at `kerberos.max_in_flight` (module docstring): 256 at the default 16."""
    return BASE_RESERVE + KDC_CALL_DESCRIPTORS * kdc_threads(max_in_flight)


def kdc_reserve_problem(max_in_flight: int, limit: int) -> str | None:
    """Why `kerberos.max_in_flight` cannot run under the open-file limit `limit`, or None: its KDC threads' sockets
    alone would take more than the quarter of the limit the reserve may be, and a silent KDC would then run the
    process out of descriptors for accept(), the admin listener, CRL fetches and the KDC calls themselves."""
    sockets = KDC_CALL_DESCRIPTORS * kdc_threads(max_in_flight)
    if sockets <= limit // 4:
        return None
    most = max(0, (limit // 4 // KDC_CALL_DESCRIPTORS - 2) // 3)
    return (
        f"kerberos.max_in_flight = {max_in_flight} runs {kdc_threads(max_in_flight)} KDC threads that may hold "
        f"{sockets} descriptors, more than a quarter of the open-file limit ({limit}) may be kept for them: lower "
        f"it to {most} or less, or raise the limit to {4 * reserve_for(max_in_flight)} (LimitNOFILE= in the systemd "
        "unit, ulimit -Hn, the container's nofile)"
    )


def reload_reserve_problem(max_in_flight: int, running: DescriptorBudget) -> str | None:
    """Why a reload may not run `kerberos.max_in_flight` = `max_in_flight` on the shares the `running` worker set at
    start, or None: its KDC threads need more than the reserve kept then (or more than the limit allows at all)."""
    if problem := kdc_reserve_problem(max_in_flight, running.limit):
        return problem
    wanted = DescriptorBudget.of(running.wanted, max_in_flight, running.limit).reserve
    if wanted <= running.reserve:
        return None
    most = max(0, ((running.reserve - BASE_RESERVE) // KDC_CALL_DESCRIPTORS - 2) // 3)
    return (
        f"kerberos.max_in_flight = {max_in_flight} runs {kdc_threads(max_in_flight)} KDC threads and needs a "
        f"descriptor reserve of {wanted}, where the running gateway keeps a reserve of {running.reserve}, set at "
        f"start (the open-file limit's shares are set once): restart to apply, or keep it at {most} or less"
    )

"""Header rewriting with each header name's verdict remembered: the same headers go, whatever came before.

`proxy.backend.headers` decides per header name whether it may pass (hop-by-hop, an identity claim, an
underscore) once and remembers it, up to a bound: header names come from devices and backends, so these
tests throw many, in every case and underscore spelling, past the bound, and compare each request's
rewritten headers with the rules applied afresh.
"""

from __future__ import annotations

import random

from multidict import CIMultiDict

from proxy.backend import headers
from proxy.backend.headers import HOP_BY_HOP, IDENTITY, IDENTITY_PREFIXES, is_identity_header, to_backend, to_client

SPELLINGS = [*IDENTITY, *(p + "user" for p in IDENTITY_PREFIXES), *HOP_BY_HOP, "host", "accept", "content-type"]


def variants(rng: random.Random, name: str) -> str:
    name = "".join(c.upper() if rng.random() < 0.5 else c for c in name)
    return name.replace("-", "_") if rng.random() < 0.2 else name


def expected_to_backend(client: CIMultiDict[str], named: set[str]) -> list[tuple[str, str]]:
    """The rules of `to_backend`, applied afresh (no memory): what the client's headers become."""
    kept = []
    for name, value in client.items():
        n = name.lower()
        if n in HOP_BY_HOP or n in named or "_" in name or is_identity_header(name) or n == "host":
            continue
        kept.append((name, value))
    return kept


def test_every_request_gets_the_rules_whatever_names_came_before() -> None:
    """3,000 requests with names in random spellings and 20,000 made-up ones (past the memory's bound): the
    client's headers that reach the backend are exactly those the rules let through."""
    rng = random.Random(18)
    for n in range(3000):
        client: CIMultiDict[str] = CIMultiDict()
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.5:
                name = variants(rng, rng.choice(SPELLINGS))
            else:
                name = f"X-Made-Up-{n}-{rng.randint(0, 10)}" + ("_x" if rng.random() < 0.1 else "")
            client.add(name, str(rng.random()))
        if rng.random() < 0.2:
            client.add("Connection", f"x-made-up-{n}-1, Keep-Alive")
        named = {t.strip().lower() for v in client.getall("Connection", []) for t in v.split(",")}
        out = to_backend(client, client_ip="192.0.2.1", client_host="", upstream_host="cas", authorization="N")
        ours = [
            (k, v) for k, v in out.items() if k not in ("Host", "Authorization", "X-Forwarded-For", "X-Forwarded-Proto")
        ]
        assert ours == expected_to_backend(client, named), client
    assert len(headers._TO_BACKEND) <= headers.REMEMBERED_NAMES


def test_the_device_gets_the_rules_whatever_names_came_before() -> None:
    """Backend answers with names in random spellings: challenges, hop-by-hop and lengths never pass."""
    rng = random.Random(18)
    for n in range(2000):
        backend: CIMultiDict[str] = CIMultiDict()
        for _ in range(rng.randint(1, 8)):
            pool = [*HOP_BY_HOP, "www-authenticate", "content-length", "set-cookie", f"x-made-up-{n}"]
            backend.add(variants(rng, rng.choice(pool)).replace("_", "-"), "v")
        out = to_client(backend)
        drop = HOP_BY_HOP | {"www-authenticate", "content-length"}
        assert list(out.items()) == [(k, v) for k, v in backend.items() if k.lower() not in drop]
    assert len(headers._TO_CLIENT) <= headers.REMEMBERED_NAMES

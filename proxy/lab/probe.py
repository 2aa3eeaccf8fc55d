"""`python3 -m proxy.lab.probe kdc|backend|crl|gateway`: the compose services' health check, kept light.

It asks the part what `kcd-proxy lab probe <part>` asks (`proxy.lab.serve.probe`: slapd an LDAP search and the
KDC an AS-REQ, the backend `/healthz`, the CRL server a CRL, the gateway its admin listener's `/readyz`) and exits
0, or prints what is wrong and exits 1. It runs every 5 s in every container, so it imports the layout, the probe
and the standard library only: `kcd-proxy` imports the whole command line first (the configuration,
cryptography, the AD and PKI lab modules: 0.2 s of CPU a run), and on a machine at load 30 every service's probe
passed its 5 s timeout while the services answered.
"""

from __future__ import annotations

import argparse
import os
import sys

from proxy.lab import serve
from proxy.lab.layout import LabLayout


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m proxy.lab.probe", description=__doc__.splitlines()[0])
    p.add_argument("component", choices=serve.PROBES)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        layout = LabLayout.from_env(os.environ)
    except ValueError as e:
        print(f"probe: {e}", file=sys.stderr)
        return 2
    problem = serve.probe(layout, args.component)
    print(f"{args.component}: {problem or 'ok'}")  # as `kcd-proxy lab probe` says it; docker keeps it per check
    return 1 if problem else 0


if __name__ == "__main__":
    sys.exit(main())

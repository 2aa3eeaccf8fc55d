"""The process's default credential cache: a MEMORY cache, so that MIT never writes a ticket to disk for us.

Theory of operation. The gateway names every credential cache it uses (`MEMORY:` names, passed as bytes where the
raw python-gssapi API takes them: `proxy.kerberos.ap_req`), and needs no default one. MIT falls back to the default
ccache whenever a call names none (or a name it was given is lost: the python-gssapi defect behind
tests/integration/test_ccache_names.py), and that default is `KRB5CCNAME`, else `FILE:/tmp/krb5cc_<uid>`: a user's
tickets and session keys on disk. `pin` sets `KRB5CCNAME` to a MEMORY name of the process's own, whatever the
environment said (the gateway has no use for an operator's cache), before any thread exists: setting a variable the
environment does not have yet may move glibc's environment array under a thread reading it (`getenv` in MIT), while
replacing one later (the directory's bind, `proxy.directory`) leaves the array where it is.
"""

from __future__ import annotations

import os
from typing import Final

DEFAULT_CCACHE: Final = "MEMORY:kcd-proxy-default"


def pin() -> None:
    """KRB5CCNAME = DEFAULT_CCACHE for this process and its children (call it before starting threads)."""
    os.environ["KRB5CCNAME"] = DEFAULT_CCACHE

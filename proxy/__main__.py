"""`python -m proxy` is the `kcd-proxy` command."""

import sys

from proxy.cli import main

sys.exit(main())

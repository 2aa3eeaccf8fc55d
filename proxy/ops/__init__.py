"""Operating the gateway: `check-config`, `explain` and `doctor`."""

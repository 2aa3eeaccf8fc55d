"""The certificates the handshake refuses, with the reason the log gives and the alert curl reports: one table,
used for the gateway on asyncio's loop (test_gateway) and on uvloop (test_uvloop)."""

HANDSHAKE_REFUSALS = [
    (None, "peer did not return a certificate", "alert certificate required"),
    ("expired", "certificate has expired", "alert certificate expired"),
    ("notyet", "certificate is not yet valid", "alert bad certificate"),
    ("untrusted", "unable to get local issuer certificate", "alert unknown ca"),
    ("noclientauth", "unsuitable certificate purpose", "alert unsupported certificate"),
]

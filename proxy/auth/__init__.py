"""Authentication modes: certificate, Basic credentials checked by the KDC, or both."""

"""Ray Serve service: HTTP encode/decode endpoints (see docs/serving.md)."""

"""Serving building blocks: the dynamic batcher that `lmtune serve` puts behind its HTTP routes."""

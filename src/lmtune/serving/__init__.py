"""Serving building blocks: the continuous batcher that `lmtune serve` puts behind its HTTP routes."""

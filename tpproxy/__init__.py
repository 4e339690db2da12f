"""
TP: a zero-trust, identity-aware TLS proxy for non-HTTP traffic.
"""

__version__ = "0.1.0"

"""
The C{twist tp} / C{twistd tp} plugin.  Everything lives in L{tpproxy.tap}.
"""

from twisted.application.service import ServiceMaker

tp = ServiceMaker("TP", "tpproxy.tap", "Zero-trust TLS proxy for non-HTTP traffic.", "tp")

"""
P2P: TP as matchmaker and authorizer, bytes direct between the two TP
clients (issue 16; docs/p2p.md).  L{tpproxy.p2p.direct} is the direct
QUIC connection whose two ends accept only the certificates TP vouched for
in the session that introduced them.
"""

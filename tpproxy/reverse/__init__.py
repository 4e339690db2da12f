"""
Reverse tunnels: the server's registry of exposures, public ports and
waiting dialers (L{registry}), and the client that exposes a local port
(L{expose}, C{tp expose}).
"""

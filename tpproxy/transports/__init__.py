"""
How TP's bytes travel: TLS over TCP with half-close (L{tls}) and the
server's handshake (L{servertls}), QUIC driven from the reactor (L{quic}),
UDP flows over QUIC datagrams or framed on a stream (L{udp}), and the small
HTTP/3 responder that makes the QUIC port answer browsers (L{h3}).

The wire protocol itself (L{tpproxy.wire}) is sans-IO and knows none of
these; L{tpproxy.protocols.server} runs the same way over each.
"""

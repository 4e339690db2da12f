"""
TP's own certificates from an ACME CA (RFC 8555): the protocol client
(L{client}, on certbot's C{acme} library and treq), the certificate store
(L{store}), the http-01 and tls-alpn-01 challenge responders
(L{responders}), and the service that issues and renews (L{service});
L{testing} holds the verified fakes (an in-memory CA and a fake client)
that the conformance suite checks against the real client and Pebble.
"""

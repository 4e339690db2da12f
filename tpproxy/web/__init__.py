"""
TP for browsers: the HTTPS pages and token endpoint on TP's TLS port
(L{tpproxy.web.site}), and the files it serves (C{static/}: C{tp.js}, the
SSH demo).  See docs/webtransport.md.
"""

"""
Several TP instances as one service: the routing store they share.

L{store} defines what TP keeps there (which instances are alive, which
identity holds each E2E name and public port, on which instances) as one
interface, L{IRoutingStore}, with two implementations: L{memory} (the
default, a single instance, no etcd) and L{etcd} (etcd v3 through its JSON
gateway, with treq).  L{testing} starts a real etcd for the tests, which
run one conformance suite against both (C{tpproxy.test.test_cluster_store}).
docs/cluster.md describes the keys, the leases and what each failure does.
"""

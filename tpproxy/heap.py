# -*- test-case-name: tpproxy.test.test_heap -*-
"""
Python's garbage collector, for a long-running proxy (docs/decisions.md,
issue 17).

CPython's cyclic collector scans every tracked object of the generations
it collects.  A TP process holds tens of thousands of objects from start-up
(modules, classes, aioquic's and OpenSSL's bindings, the configuration)
that live as long as it does, so each full (generation 2) collection
walked them all while a connection waited: measured in C{twist tp} under
the benchmark's connection load, collections of 22 to 77 ms, the
connection latency's 99th percentile.  L{freezeStartup} moves what exists
once start-up is over into the permanent generation, which the collector
never scans; what connections allocate is collected as before.
"""

from __future__ import annotations

import gc


def freezeStartup() -> None:
    """
    Collect what start-up left as garbage, then freeze every object that
    remains (C{gc.freeze}): later collections skip them.  Once per process:
    a later call (a second service started in the same process, as the
    tests do) does nothing, so what became garbage since is still
    collected.  (Start-up objects that become garbage later, such as the
    first configuration after a reload, stay: a bounded, one-time cost.)
    """
    if gc.get_freeze_count():
        return
    gc.collect()
    gc.freeze()

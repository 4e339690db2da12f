"""
L{tpproxy.heap}: what start-up made is frozen out of the collector's way,
in C{twist tp} (L{tpproxy.tap.ServerService}) as in the C{tp} commands.
"""

from __future__ import annotations

import gc

from twisted.application import service
from twisted.trial.unittest import SynchronousTestCase

from tpproxy import heap, tap
from tpproxy.config import loadServerConfig
from tpproxy.testing import TestPKI


class FreezeTests(SynchronousTestCase):
    def setUp(self) -> None:
        gc.unfreeze()
        self.addCleanup(gc.unfreeze)

    def test_freezeStartup(self) -> None:
        """
        Objects that exist when L{heap.freezeStartup} runs are frozen (no
        collection scans them); start-up's garbage is collected first, so
        it is not frozen with them.
        """

        class Cycle:
            pass

        garbage = Cycle()
        garbage.me = garbage  # type: ignore[attr-defined]
        collected: list[int] = []
        gc.callbacks.append(lambda phase, info: collected.append(info["collected"]) if phase == "stop" else None)
        self.addCleanup(gc.callbacks.pop)
        del garbage
        kept = [object() for _ in range(10)]
        self.assertEqual(gc.get_freeze_count(), 0)
        heap.freezeStartup()
        self.assertGreater(gc.get_freeze_count(), len(kept))
        self.assertGreaterEqual(sum(collected), 2)  # the Cycle and its dict
        self.assertFalse(any(o is kept for o in gc.get_objects()))
        # Once per process: a second call freezes nothing more.
        frozen = gc.get_freeze_count()
        later = [object() for _ in range(10)]
        heap.freezeStartup()
        self.assertEqual(gc.get_freeze_count(), frozen)
        self.assertTrue(any(o is later for o in gc.get_objects()))

    def test_serverServiceFreezes(self) -> None:
        """
        C{twist tp}'s top service freezes once its services have started.
        """
        pki = TestPKI.create(self.mktemp())
        path = pki.directory / "server.toml"
        path.write_text('[server]\nlisten = "tcp:0:interface=127.0.0.1"\nquic = false\ncertificate = "server.pem"\nkey = "server.key"\nclient_ca = "ca.pem"\n')
        started: list[int] = []

        class Child(service.Service):
            def startService(self) -> None:
                super().startService()
                started.append(gc.get_freeze_count())

        top = tap.ServerService(Child(), loadServerConfig(path))
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual(started, [0])
        self.assertGreater(gc.get_freeze_count(), 0)

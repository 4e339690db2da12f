"""
No private hook fails open: every private name of aioquic and Twisted that
TP overrides, wraps or reads is checked before it is relied on, and TP
refuses to serve (QUIC) or to import (the TLS transport) when one is off
(docs/private-apis.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from aioquic import tls as quictls
from aioquic.quic.connection import QuicConnection
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase

from tpproxy.privates import PrivateAPIError, PrivateName, privateProblems
from tpproxy.test.quicmemory import QuicWorld
from tpproxy.transports import quic, tls


class Base:
    def method(self, a: int, b: int) -> None:
        pass

    def caller(self) -> None:
        self.method(1, 2)
        self.attr = 1


class Override(Base):
    def caller(self) -> None:
        super().caller()


class ShapeTests(SynchronousTestCase):
    """
    L{privateProblems} on a small class of our own.
    """

    def test_asExpected(self) -> None:
        """
        A method with the expected parameters, called where expected, and
        an attribute set where expected: no problem, also when a subclass
        overrides the caller and calls up.
        """
        names = (PrivateName(Override, "method", ("a", "b"), ("caller",), ""), PrivateName(Override, "attr", None, ("caller",), ""))
        self.assertEqual(privateProblems(names), [])

    def test_problems(self) -> None:
        """
        A missing method, other parameters, a caller that no longer names
        it, and a caller that is gone are each reported.
        """
        problems = privateProblems(
            (
                PrivateName(Base, "gone", (), (), ""),
                PrivateName(Base, "method", ("a",), (), ""),
                PrivateName(Base, "method", ("a", "b"), ("__init__",), ""),
                PrivateName(Base, "attr", None, ("nowhere",), ""),
            )
        )
        self.assertEqual(len(problems), 4, problems)
        self.assertIn("Base.gone is not a method", problems[0])
        self.assertIn("takes (a, b), not (a)", problems[1])
        self.assertIn("Base.__init__ no longer uses method", problems[2])
        self.assertIn("Base.nowhere is gone (it used attr)", problems[3])


class AioquicTests(SynchronousTestCase):
    """
    aioquic's private names, and TP's refusal to serve QUIC without them.
    """

    def setUp(self) -> None:
        # Check again in each test, whatever an earlier one found.
        self.patch(quic, "_quicChecked", False)

    def test_installedAioquic(self) -> None:
        """
        The installed aioquic has every name TP uses, in the shape TP uses,
        and the certificate hook refuses in a real handshake.
        """
        self.assertEqual(privateProblems(quic._aioquicPrivates()), [])
        self.assertEqual(quic.selfCheckProblems(), [])
        quic.requireQuicPrivates()
        self.assertTrue(quic._quicChecked)

    def remove(self, owner: type, name: str) -> Any:
        original = owner.__dict__[name]
        delattr(owner, name)
        self.addCleanup(setattr, owner, name, original)
        return original

    def assertRefused(self, *words: str) -> None:
        """
        A QUIC listener cannot be made, with an error naming C{words}.
        """
        world = QuicWorld(self.mktemp())
        error = self.assertRaises(PrivateAPIError, world.listen)
        for word in words:
            self.assertIn(word, str(error))
        self.assertIn("TP cannot serve QUIC with aioquic", str(error))
        self.assertFalse(quic._quicChecked)

    def test_hookGone(self) -> None:
        """
        Without C{tls.Context._server_handle_certificate} (a rename in
        aioquic), no QUIC listener starts.
        """
        self.remove(quictls.Context, "_server_handle_certificate")
        self.assertRefused("_server_handle_certificate is not a method")

    def test_hookNotCalled(self) -> None:
        """
        If aioquic's handshake no longer calls the method TP wraps, no QUIC
        listener starts.
        """
        original = quictls.Context._handle_reassembled_message

        def dispatch(self: Any, *a: Any, **kw: Any) -> Any:
            return original(self, *a, **kw)

        self.patch(quictls.Context, "_handle_reassembled_message", dispatch)
        self.assertRefused("_handle_reassembled_message no longer uses _server_handle_certificate")

    def test_overrideChangedShape(self) -> None:
        """
        A method TP overrides whose parameters changed: no listener.
        """

        def _write_stream_limits(self: Any, builder: Any, space: Any, stream: Any, now: float) -> None:
            pass

        self.patch(QuicConnection, "_write_stream_limits", _write_stream_limits)
        self.assertRefused("_write_stream_limits takes (builder, space, stream, now), not (builder, space, stream)")

    def test_hookInstalledButIgnored(self) -> None:
        """
        If TP's per-connection hook no longer takes effect although every
        name is in place (here: C{tls.Context} ignores the assignment, as it
        would if aioquic dispatched through a table made in C{__init__}), a
        client with a refused certificate would get in.  The self-check
        handshake catches that, and no listener starts.
        """

        def setattrIgnoringHook(context: Any, name: str, value: Any) -> None:
            if name != "_server_handle_certificate":
                object.__setattr__(context, name, value)

        self.patch(quictls.Context, "__setattr__", setattrIgnoringHook)
        self.assertEqual(privateProblems(quic._aioquicPrivates()), [])
        self.assertRefused("the certificate hook did not run", "a refused certificate was not refused")

    def test_makeQuicListenerRefuses(self) -> None:
        """
        TP's server builds its QUIC listeners with L{makeQuicListener}: it
        is refused there, so C{twist tp} stops at start with the error.
        """
        from tpproxy.service import makeQuicListener, makeServerFactory

        world = QuicWorld(self.mktemp())
        config = world.pki.serverConfig()
        factory = makeServerFactory(config, world.reactor).wrappedFactory
        self.remove(quictls.Context, "_server_handle_certificate")
        self.assertRaises(PrivateAPIError, makeQuicListener, config, world.reactor, factory)


class TwistedTests(SynchronousTestCase):
    """
    The private names of Twisted's TLS transport that
    L{tpproxy.transports.tls.HalfCloseTLSProtocol} overrides or reads.
    """

    def test_installedTwisted(self) -> None:
        self.assertEqual(privateProblems(tls._twistedPrivates()), [])
        tls.requireTwistedPrivates()

    def test_overrideGone(self) -> None:
        """
        Without C{_flushReceiveBIO} (which TP overrides for half-close) the
        check names it.
        """
        original = TLSMemoryBIOProtocol.__dict__["_flushReceiveBIO"]
        del TLSMemoryBIOProtocol._flushReceiveBIO
        self.addCleanup(setattr, TLSMemoryBIOProtocol, "_flushReceiveBIO", original)
        error = self.assertRaises(PrivateAPIError, tls.requireTwistedPrivates)
        self.assertIn("_flushReceiveBIO is not a method", str(error))

    def test_importRefused(self) -> None:
        """
        TP's TLS transport refuses to import with such a Twisted: every
        command and the server stop at start with the message.
        """
        code = (
            "import twisted.protocols.tls as t\n"
            "del t.TLSMemoryBIOProtocol._checkHandshakeStatus\n"
            "import tpproxy.transports.tls\n"
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"ImportError: TP cannot run its TLS transport on Twisted", result.stderr)
        self.assertIn(b"_checkHandshakeStatus is not a method", result.stderr)

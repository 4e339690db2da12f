"""
Tests for exposer HA on the client (issue 13): L{ExposerLinks} (one
exposure kept on several L{Exposer}s, one per link), L{linkAddresses}
(which servers get a link), L{runExpose}'s members, L{ServerAddress} and
the C{--server}/C{--links} options of C{tp}.  All in memory: the links run
on the fake uplinks of L{tpproxy.test.test_goaway} and a L{Clock}; names
resolve from a table.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tpproxy import cli
from tpproxy.protocols.client import Refused, ServerAddress, TunnelError
from tpproxy.reverse import expose
from tpproxy.reverse.expose import Exposer, ExposerLinks, ExposerState, linkAddresses, runExpose
from tpproxy.test.test_goaway import FakeSettings, FakeUplink, TPEnd
from tpproxy.test.test_server import FakeResolver
from tpproxy.testing import TestPKI
from tpproxy.wire import ClientHello, ErrorCode

E2E = ClientHello("listen", mode="e2e", name="ssh.alice.example")
PUBLIC = ClientHello("listen", mode="public", port=0)


class LinksTestCase(SynchronousTestCase):
    """
    An L{ExposerLinks} of one L{Exposer} per server, each on its own
    L{FakeUplink}s, sharing a L{Clock} and one stderr.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.stderr = io.StringIO()

    def makeLinks(self, hello: ClientHello, hosts: list[str]) -> ExposerLinks:
        self.uplinks: dict[int, list[FakeUplink]] = {}
        links = []
        for index, host in enumerate(hosts):
            uplinks: list[FakeUplink] = self.uplinks.setdefault(index, [])

            def makeUplink(
                exposer: Exposer, settings: Any, previous: Any = None, uplinks: list[FakeUplink] = uplinks
            ) -> FakeUplink:
                uplink = FakeUplink(exposer, settings, previous)
                uplinks.append(uplink)
                return uplink

            links.append(
                Exposer(
                    self.clock,  # type: ignore[arg-type]
                    FakeSettings(server=ServerAddress(host, 443)),
                    ("127.0.0.1", 22),
                    ClientHello(hello.op, mode=hello.mode, name=hello.name, port=hello.port, member=f"link{index}"),
                    15.0,
                    self.stderr,
                    uplink=makeUplink,  # type: ignore[arg-type]
                )
            )
        self.group = ExposerLinks(links)
        return self.group

    def ends(self, index: int) -> list[TPEnd]:
        """
        The signalling connections link C{index} made, oldest first.
        """
        return [end for uplink in self.uplinks[index] for end in uplink.ends]

    def state(self, index: int) -> ExposerState:
        return self.group.links[index].state

    def lines(self) -> list[str]:
        return self.stderr.getvalue().splitlines()


class AllAtOnceTests(LinksTestCase):
    """
    An E2E name (or a public port given): every link starts at once.
    """

    def test_firstRegistrationFiresStart(self) -> None:
        """
        Every link connects at once; C{start()} fires with the answer of
        the first link TP registers (whichever it is), and the other links
        register too, each its own connection.
        """
        first = self.makeLinks(E2E, ["a.example", "b.example", "c.example"]).start()
        self.assertEqual([len(self.ends(i)) for i in range(3)], [1, 1, 1])
        self.assertEqual({self.ends(i)[0].hello().name for i in range(3)}, {"ssh.alice.example"})
        self.assertNoResult(first)

        [b] = self.ends(1)
        b.answer(name="ssh.alice.example", at="b")
        self.assertEqual(self.successResultOf(first), {"name": "ssh.alice.example", "at": "b"})
        self.assertIs(self.state(1), ExposerState.UP)
        self.assertEqual([self.state(0), self.state(2)], [ExposerState.CONNECTING] * 2)

        self.ends(0)[0].answer(name="ssh.alice.example", at="a")
        self.ends(2)[0].answer(name="ssh.alice.example", at="c")
        self.assertEqual([self.state(i) for i in range(3)], [ExposerState.UP] * 3)
        self.assertEqual([link.info["at"] for link in self.group.links], ["a", "b", "c"])
        self.assertEqual([len(self.ends(i)) for i in range(3)], [1, 1, 1])

    def test_givenPublicPortAllAtOnce(self) -> None:
        """
        A public port given (not 0) is asked for on every link at once.
        """
        self.makeLinks(ClientHello("listen", mode="public", port=2222), ["a.example", "b.example"]).start()
        self.assertEqual([[end.hello().port for end in self.ends(i)] for i in range(2)], [[2222], [2222]])

    def test_refusedWhileAnotherUpKeepsTrying(self) -> None:
        """
        A link TP refuses on its first try while another link is up does
        not fail the command: it says so and, after a backoff delay,
        connects again with the same hello; that attempt registers.
        """
        first = self.makeLinks(E2E, ["a.example", "b.example"]).start()
        self.ends(0)[0].answer(name="ssh.alice.example")
        self.successResultOf(first)
        self.ends(1)[0].refuse(ErrorCode.FORBIDDEN, "not here")
        self.assertIs(self.state(1), ExposerState.WAITING)
        self.assertEqual(self.lines()[-1], "[b.example:443] TP did not take the exposure: forbidden: not here; retrying")
        self.assertEqual(len(self.ends(1)), 1)

        self.clock.advance(2)
        [_, again] = self.ends(1)
        self.assertEqual(again.hello(), self.ends(1)[0].hello())
        self.assertIs(self.state(1), ExposerState.CONNECTING)
        again.answer(name="ssh.alice.example")
        self.assertEqual([self.state(i) for i in range(2)], [ExposerState.UP] * 2)

    def test_unreachableWhileAnotherUpKeepsTrying(self) -> None:
        """
        The same for a link whose instance cannot be reached: it keeps
        trying with backoff until it can.
        """
        self.makeLinks(E2E, ["a.example", "b.example"])
        self.uplinks[1][0].unreachable = True
        first = self.group.start()
        self.assertIs(self.state(1), ExposerState.FAILED)
        self.ends(0)[0].answer(name="ssh.alice.example")
        self.successResultOf(first)
        # Tried again at once, still unreachable: now with backoff.
        self.assertIs(self.state(1), ExposerState.WAITING)
        self.assertIn("[b.example:443] TP did not take the exposure: cannot reach TP at b.example:443", self.lines()[-1])
        self.clock.advance(0.6)
        self.assertIs(self.state(1), ExposerState.WAITING)
        self.uplinks[1][0].unreachable = False
        self.clock.advance(30)
        [end] = self.ends(1)
        end.answer(name="ssh.alice.example")
        self.assertIs(self.state(1), ExposerState.UP)

    def test_failedBeforeAnotherUpTriedAgain(self) -> None:
        """
        A link whose first registration failed (FAILED) before any other
        was up is tried again as soon as another comes up, without waiting
        for a backoff delay, with the same hello.
        """
        first = self.makeLinks(E2E, ["a.example", "b.example"]).start()
        self.ends(0)[0].refuse(ErrorCode.FORBIDDEN, "not yet")
        self.assertIs(self.state(0), ExposerState.FAILED)
        self.assertNoResult(first)

        self.ends(1)[0].answer(name="ssh.alice.example")
        self.successResultOf(first)
        self.assertIs(self.state(0), ExposerState.CONNECTING)
        [old, again] = self.ends(0)
        self.assertEqual(again.hello(), old.hello())
        again.answer(name="ssh.alice.example")
        self.assertIs(self.state(0), ExposerState.UP)

    def test_lostLinkReconnectsAlone(self) -> None:
        """
        One link losing its connection reconnects after backoff, with the
        same member; the other link is left alone.
        """
        self.makeLinks(E2E, ["a.example", "b.example"]).start()
        for i in range(2):
            self.ends(i)[0].answer(name="ssh.alice.example")
        self.ends(0)[0].close()
        self.assertEqual([self.state(0), self.state(1)], [ExposerState.WAITING, ExposerState.UP])
        self.assertTrue(self.lines()[-1].startswith("[a.example:443] Lost the connection to TP"), self.lines())
        self.clock.advance(2)
        [old, new] = self.ends(0)
        self.assertEqual(new.hello().member, "link0")
        self.assertEqual(new.hello(), old.hello())
        self.assertEqual(len(self.ends(1)), 1)
        self.assertFalse(self.ends(1)[0].closedByExposer)


class EveryLinkFailedTests(LinksTestCase):
    def test_everyLinkRefused(self) -> None:
        """
        Every link refused on its first try: C{start()} fails with TP's
        refusal, and nothing is tried again.
        """
        first = self.makeLinks(E2E, ["a.example", "b.example"]).start()
        self.ends(0)[0].refuse(ErrorCode.FORBIDDEN, "no (a)")
        self.assertNoResult(first)
        self.ends(1)[0].refuse(ErrorCode.FORBIDDEN, "no (b)")
        error = self.failureResultOf(first, Refused).value
        self.assertEqual((error.code, error.message), ("forbidden", "no (a)"))
        self.assertEqual([self.state(i) for i in range(2)], [ExposerState.FAILED] * 2)
        self.clock.advance(120)
        self.assertEqual([len(self.ends(i)) for i in range(2)], [1, 1])

    def test_refusalPreferredToUnreachable(self) -> None:
        """
        One link unreachable (it fails first) and another refused: the
        command fails with the refusal, which says more.
        """
        self.makeLinks(E2E, ["a.example", "b.example"])
        self.uplinks[0][0].unreachable = True
        first = self.group.start()
        self.assertIs(self.state(0), ExposerState.FAILED)
        self.assertNoResult(first)
        self.ends(1)[0].refuse(ErrorCode.NAME_TAKEN, "taken")
        error = self.failureResultOf(first, Refused).value
        self.assertEqual(error.message, "taken")

    def test_refusalPreferredWhicheverOrder(self) -> None:
        """
        The same when the refusal comes first and the other link then
        finds its instance closed before it answered.
        """
        first = self.makeLinks(E2E, ["a.example", "b.example"]).start()
        self.ends(0)[0].refuse(ErrorCode.FORBIDDEN, "no")
        self.ends(1)[0].proto.connectionLost(Failure(ConnectionDone("closed")))
        error = self.failureResultOf(first, Refused).value
        self.assertEqual(error.message, "no")

    def test_everyLinkUnreachable(self) -> None:
        """
        No link reached TP: C{start()} fails with the first link's error.
        """
        self.makeLinks(E2E, ["a.example", "b.example"])
        for i in range(2):
            self.uplinks[i][0].unreachable = True
        error = self.failureResultOf(self.group.start(), TunnelError).value
        self.assertNotIsInstance(error, Refused)
        self.assertIn("cannot reach TP at a.example:443", str(error))


class PublicPortInTurnTests(LinksTestCase):
    """
    A public port TP picks (port 0): one link at a time until one is up,
    then the others ask for the port it got.
    """

    def test_othersAskForThePortTheFirstGot(self) -> None:
        """
        Only the first link connects; once it has its port, C{start()}
        fires and the other links start, asking for that port.
        """
        first = self.makeLinks(PUBLIC, ["a.example", "b.example", "c.example"]).start()
        self.assertEqual([len(self.ends(i)) for i in range(3)], [1, 0, 0])
        self.assertEqual(self.ends(0)[0].hello().port, 0)
        self.assertEqual([self.state(1), self.state(2)], [ExposerState.IDLE] * 2)

        self.ends(0)[0].answer(port=4000)
        self.assertEqual(self.successResultOf(first), {"port": 4000})
        self.assertEqual([[end.hello().port for end in self.ends(i)] for i in (1, 2)], [[4000], [4000]])
        for i in (1, 2):
            self.ends(i)[0].answer(port=4000)
        self.assertEqual([self.state(i) for i in range(3)], [ExposerState.UP] * 3)
        self.assertEqual([link.hello.port for link in self.group.links], [4000] * 3)

    def test_firstFailsSecondTriedAsFirst(self) -> None:
        """
        If the first link fails, the second is tried as the first (asking
        TP to pick); the third then asks for the port the second got.
        """
        first = self.makeLinks(PUBLIC, ["a.example", "b.example", "c.example"]).start()
        self.ends(0)[0].refuse(ErrorCode.FORBIDDEN, "not at a")
        self.assertNoResult(first)
        self.assertEqual([len(self.ends(i)) for i in range(3)], [1, 1, 0])
        self.assertEqual(self.ends(1)[0].hello().port, 0)
        self.ends(1)[0].answer(port=5000)
        self.assertEqual(self.successResultOf(first), {"port": 5000})
        self.assertEqual([end.hello().port for end in self.ends(2)], [5000])

    def test_failedFirstLinkAsksForThePortOnRetry(self) -> None:
        """
        The first link, which failed before the second got a port, is
        tried again once the second is up: it asks for the second's port,
        not for a new one (else the exposure would have two public ports).
        """
        first = self.makeLinks(PUBLIC, ["a.example", "b.example"]).start()
        self.ends(0)[0].refuse(ErrorCode.FORBIDDEN, "not at a")
        self.ends(1)[0].answer(port=5000)
        self.successResultOf(first)
        self.assertIs(self.state(0), ExposerState.CONNECTING)
        [_, again] = self.ends(0)
        self.assertEqual(again.hello().port, 5000)

    def test_allFail(self) -> None:
        """
        Every link tried in turn fails: C{start()} fails, preferring a
        refusal to an unreachable instance.
        """
        self.makeLinks(PUBLIC, ["a.example", "b.example"])
        self.uplinks[1][0].unreachable = True
        first = self.group.start()
        self.ends(0)[0].refuse(ErrorCode.FORBIDDEN, "not at a")
        error = self.failureResultOf(first, Refused).value
        self.assertEqual(error.message, "not at a")
        self.assertEqual([self.state(i) for i in range(2)], [ExposerState.FAILED] * 2)

    def test_reconnectAsksForTheSamePort(self) -> None:
        """
        A link of a public port TP picked that loses its connection asks
        for that port again, with its member.
        """
        self.makeLinks(PUBLIC, ["a.example", "b.example"]).start()
        self.ends(0)[0].answer(port=4000)
        self.ends(1)[0].answer(port=4000)
        self.ends(0)[0].close()
        self.clock.advance(2)
        [_, again] = self.ends(0)
        self.assertEqual((again.hello().port, again.hello().member), (4000, "link0"))


class LabelTests(LinksTestCase):
    def test_severalLinksLabelEachLine(self) -> None:
        """
        With several links, each line a link says starts with its server
        in brackets.
        """
        self.makeLinks(E2E, ["a.example", "b.example"]).start()
        self.ends(0)[0].answer(name="ssh.alice.example")
        self.ends(1)[0].refuse(ErrorCode.FORBIDDEN, "no")
        self.clock.advance(2)
        self.ends(1)[1].answer(name="ssh.alice.example")
        stopped = self.group.stop()
        for end in (self.ends(0)[0], self.ends(1)[1]):
            self.assertTrue(end.closedByExposer)
            end.close()
        self.successResultOf(stopped)
        lines = self.lines()
        self.assertEqual(len(lines), 5, lines)
        for line in lines:
            self.assertRegex(line, r"^\[[ab]\.example:443\] ")
        self.assertEqual(
            lines[0],
            "[a.example:443] Exposing 127.0.0.1:22 as E2E name ssh.alice.example via a.example:443 (v1, tls); Ctrl-C stops",
        )
        self.assertEqual(lines[-1], "[b.example:443] Stopping: 127.0.0.1:22 is no longer exposed")

    def test_oneLinkNoLabel(self) -> None:
        """
        With one link, lines are as an exposer without links says them.
        """
        self.makeLinks(E2E, ["a.example"]).start()
        self.ends(0)[0].answer(name="ssh.alice.example")
        self.assertEqual(
            self.lines(), ["Exposing 127.0.0.1:22 as E2E name ssh.alice.example via a.example:443 (v1, tls); Ctrl-C stops"]
        )
        self.assertEqual(self.group.links[0].label, "")


# --- linkAddresses ----------------------------------------------------------------


@implementer(IHostResolution)
class _Resolution:
    name = "broken"

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class BrokenResolver:
    """
    A resolver that fails outright (not an empty answer).
    """

    def resolveHostName(self, *args: Any, **kw: Any) -> IHostResolution:
        raise OSError("resolver is broken")


def resolvingReactor(hosts: dict[str, list[str]]) -> MemoryReactorClock:
    reactor = MemoryReactorClock()
    reactor.nameResolver = FakeResolver(hosts)  # type: ignore[attr-defined]
    return reactor


class LinkAddressesTests(SynchronousTestCase):
    HOSTS = {
        "tp.example": ["192.0.2.1", "192.0.2.2", "192.0.2.3"],
        "dual.example": ["2001:db8::1", "192.0.2.9"],
        "dual6.example": ["2001:db8::1", "2001:db8::2", "192.0.2.9", "192.0.2.10"],
        "one.example": ["192.0.2.7"],
    }

    def links(self, servers: list[ServerAddress], links: int, reactor: Any = None) -> list[ServerAddress]:
        result: list[ServerAddress] = self.successResultOf(linkAddresses(reactor or resolvingReactor(self.HOSTS), servers, links))
        return result

    def test_ipLiteral(self) -> None:
        """
        An IP literal is one link, unpinned, and is not looked up.
        """
        reactor = resolvingReactor(self.HOSTS)
        for host in ("192.0.2.50", "2001:db8::50"):
            server = ServerAddress(host, 8443)
            self.assertEqual(self.links([server], 2, reactor), [server])
        self.assertEqual(reactor.nameResolver.queries, [])  # type: ignore[attr-defined]

    def test_severalAddresses(self) -> None:
        """
        A name with three IPv4 addresses gets C{links} links, each pinned
        to one address in the resolver's order, each keeping the name
        (its certificate is checked against it) and the port.
        """
        server = ServerAddress("tp.example", 8443)
        self.assertEqual(
            self.links([server], 2),
            [ServerAddress("tp.example", 8443, "192.0.2.1"), ServerAddress("tp.example", 8443, "192.0.2.2")],
        )
        three = self.links([server], 16)
        self.assertEqual([s.address for s in three], ["192.0.2.1", "192.0.2.2", "192.0.2.3"])
        self.assertEqual({(s.host, s.port) for s in three}, {("tp.example", 8443)})

    def test_oneOfEachFamily(self) -> None:
        """
        One IPv6 address then one IPv4 address is one host: one link,
        unpinned.
        """
        server = ServerAddress("dual.example", 443)
        self.assertEqual(self.links([server], 2), [server])

    def test_firstFamilyOnly(self) -> None:
        """
        Several addresses of each family: the links go to the first
        answer's family only.
        """
        result = self.links([ServerAddress("dual6.example", 443)], 4)
        self.assertEqual([s.address for s in result], ["2001:db8::1", "2001:db8::2"])

    def test_oneLinkWanted(self) -> None:
        """
        C{links=1}: one unpinned link, however many addresses.
        """
        server = ServerAddress("tp.example", 443)
        self.assertEqual(self.links([server], 1), [server])

    def test_oneAddress(self) -> None:
        server = ServerAddress("one.example", 443)
        self.assertEqual(self.links([server], 2), [server])

    def test_resolutionFails(self) -> None:
        """
        A name that does not resolve now (no answer, or the resolver
        fails) gets one unpinned link, which reports that itself.
        """
        server = ServerAddress("nowhere.example", 443)
        self.assertEqual(self.links([server], 2), [server])
        broken = MemoryReactorClock()
        broken.nameResolver = BrokenResolver()  # type: ignore[attr-defined]
        self.assertEqual(self.links([server], 2, broken), [server])

    def test_eachServer(self) -> None:
        """
        Several servers: each gets its own links, in the order given.
        """
        result = self.links([ServerAddress("one.example", 1), ServerAddress("tp.example", 2), ServerAddress("192.0.2.99", 3)], 2)
        self.assertEqual(
            result,
            [
                ServerAddress("one.example", 1),
                ServerAddress("tp.example", 2, "192.0.2.1"),
                ServerAddress("tp.example", 2, "192.0.2.2"),
                ServerAddress("192.0.2.99", 3),
            ],
        )


class ServerAddressTests(SynchronousTestCase):
    def test_withoutAddress(self) -> None:
        """
        Without an address, TP is reached at its host.
        """
        self.assertEqual(ServerAddress("tp.example", 443).connectHost, "tp.example")
        self.assertEqual(str(ServerAddress("tp.example", 443)), "tp.example:443")
        self.assertEqual(str(ServerAddress("::1", 8443)), "[::1]:8443")

    def test_withAddress(self) -> None:
        """
        With an address, TP is reached there; C{str()} names both.
        """
        pinned = ServerAddress("tp.example", 443, "192.0.2.1")
        self.assertEqual(pinned.connectHost, "192.0.2.1")
        self.assertEqual(pinned.host, "tp.example")
        self.assertEqual(str(pinned), "tp.example:443 (at 192.0.2.1)")
        self.assertEqual(str(ServerAddress("tp.example", 443, "2001:db8::1")), "tp.example:443 (at 2001:db8::1)")


# --- runExpose: a member per link ----------------------------------------------------


class RunExposeTests(SynchronousTestCase):
    """
    L{runExpose} with real settings (certificate files) and a name table,
    its links on L{FakeUplink}s.
    """

    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        cert, key = self.pki.client("alice")
        self.settings = cli.Settings(ServerAddress("tp.example", 443), cert, key, self.pki.caPath, 15.0)
        self.reactor = resolvingReactor({"tp.example": ["192.0.2.1", "192.0.2.2", "192.0.2.3"]})
        self.stderr = io.StringIO()
        self.exposers: list[Exposer] = []
        self.uplinks: list[list[FakeUplink]] = []
        test = self

        class RecordedExposer(Exposer):
            def __init__(self, *args: Any, **kw: Any) -> None:
                uplinks: list[FakeUplink] = []
                test.uplinks.append(uplinks)

                def makeUplink(exposer: Exposer, settings: Any, previous: Any = None) -> FakeUplink:
                    uplink = FakeUplink(exposer, settings, previous)
                    uplinks.append(uplink)
                    return uplink

                super().__init__(*args, uplink=makeUplink, **kw)  # type: ignore[arg-type]
                test.exposers.append(self)

        self.patch(expose, "Exposer", RecordedExposer)

    def ends(self, index: int) -> list[TPEnd]:
        return [end for uplink in self.uplinks[index] for end in uplink.ends]

    def expose(self, hello: ClientHello, **kw: Any) -> Any:
        return runExpose(self.reactor, self.settings, ("127.0.0.1", 22), hello, 15.0, self.stderr, **kw)

    def test_linkPerAddress(self) -> None:
        """
        By default, a name with three addresses gets two links, each to
        one address; each link's hello carries a member of its own, valid
        on the wire.  The command runs on once one link registers.
        """
        running = self.expose(E2E)
        self.assertEqual(
            [str(e.settings.server) for e in self.exposers], ["tp.example:443 (at 192.0.2.1)", "tp.example:443 (at 192.0.2.2)"]
        )
        members = [self.ends(i)[0].hello().member for i in range(2)]
        self.assertEqual(len(set(members)), 2, members)
        for member in members:
            self.assertIsNotNone(member)
            self.assertRegex(member, r"^[A-Za-z0-9_-]{1,64}$")
        self.ends(0)[0].answer(name="ssh.alice.example")
        self.assertNoResult(running)
        self.assertIs(self.exposers[0].state, ExposerState.UP)
        self.assertTrue(self.stderr.getvalue().startswith("[tp.example:443 (at 192.0.2.1)] Exposing"), self.stderr.getvalue())

    def test_serversGiven(self) -> None:
        """
        C{servers} given: a link to each (an IP literal is not pinned);
        C{links=1} keeps one link to a name with several addresses.
        """
        self.expose(E2E, servers=[ServerAddress("tp.example", 8443), ServerAddress("192.0.2.80", 443)], links=1)
        self.assertEqual(
            [e.settings.server for e in self.exposers], [ServerAddress("tp.example", 8443), ServerAddress("192.0.2.80", 443)]
        )

    def test_reconnectKeepsMemberAndPort(self) -> None:
        """
        A link that loses its connection registers again, after backoff,
        with the same member and (a public port TP picked) the same port;
        the other link keeps its own member.
        """
        self.expose(PUBLIC)
        [first] = self.ends(0)
        self.assertEqual(self.ends(1), [])
        first.answer(port=4000)
        [second] = self.ends(1)
        self.assertEqual(second.hello().port, 4000)
        self.assertNotEqual(second.hello().member, first.hello().member)
        second.answer(port=4000)

        for index, end in ((0, first), (1, second)):
            end.close()
            self.reactor.advance(2)
            again = self.ends(index)[-1]
            self.assertIsNot(again, end)
            self.assertEqual((again.hello().member, again.hello().port), (end.hello().member, 4000))
            again.answer(port=4000)

    def test_everyLinkFailsStops(self) -> None:
        """
        Every link refused: the command fails with the refusal and its
        links are stopped (quietly).
        """
        running = self.expose(E2E)
        for i in range(2):
            self.ends(i)[0].refuse(ErrorCode.FORBIDDEN, "no")
        self.failureResultOf(running, Refused)
        self.assertEqual([e.state for e in self.exposers], [ExposerState.STOPPED] * 2)
        self.assertNotIn("Stopping", self.stderr.getvalue())


# --- the command line ----------------------------------------------------------------


class ServerOptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pki = TestPKI.create(self.mktemp())
        self.cert, self.key = self.pki.client("alice")
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("TP_")})
        os.environ["XDG_CONFIG_HOME"] = str(Path(self.mktemp()).absolute())
        self.files = ["--cert", self.cert, "--key", self.key, "--ca", self.pki.caPath]

    def usageError(self, argv: list[str]) -> str:
        err = io.StringIO()
        self.patch(cli.sys, "stderr", err)
        exit = self.assertRaises(SystemExit, cli.main, argv)
        self.assertEqual(exit.code, 2)
        self.assertNotIn("Traceback", err.getvalue())
        return err.getvalue()

    def test_severalServersOnlyForExpose(self) -> None:
        """
        C{tp connect} (and C{tp up}) with two C{--server}s is a usage error
        naming C{--server}.
        """
        for argv in (
            ["connect", "--server", "a:1", "--server", "b:2", "x:22"],
            ["up", "x:22", "2222", "--server", "a:1", "--server", "b:2"],
        ):
            message = self.usageError(argv + self.files)
            self.assertIn("tp: error: --server:", message)
            self.assertIn("only tp expose takes several", message)

    def test_exposeTakesSeveral(self) -> None:
        """
        C{tp expose} takes several C{--server}s: the settings use the
        first, and each is kept in order.
        """
        argv = ["expose", "127.0.0.1:22", "--e2e", "x.example", "--server", "a", "--server", "b:8443"]
        args = cli.buildParser().parse_args(argv + self.files)
        self.assertEqual(cli._servers(args), ["a", "b:8443"])
        settings = cli.resolveSettings(args)
        self.assertEqual(settings.server, ServerAddress("a", 443))
        self.assertEqual(args.links, 2)

    def test_serversBeforeAndAfterCommand(self) -> None:
        """
        Connection options go before or after the command, and the
        C{--server}s given on both sides all count: C{tp expose} keeps a
        link to each, and C{tp connect} with one on each side is a usage
        error like two on one side (not the last one, silently).
        """
        argv = ["--server", "a", "expose", "127.0.0.1:22", "--e2e", "x.example", "--server", "b"]
        args = cli.buildParser().parse_args(argv + self.files)
        self.assertEqual(cli._servers(args), ["a", "b"])
        message = self.usageError(["--server", "a:1", "connect", "x:22", "--server", "b:2"] + self.files)
        self.assertIn("tp: error: --server:", message)

    def test_links(self) -> None:
        """
        C{--links} takes 1 to 16; anything else is a usage error.
        """
        base = ["expose", "127.0.0.1:22", "--public", "--server", "a"] + self.files
        for value in ("1", "16"):
            self.assertEqual(cli.buildParser().parse_args(base + ["--links", value]).links, int(value))
        for value in ("0", "17", "-1", "two"):
            err = io.StringIO()
            self.patch(cli.sys, "stderr", err)
            exit = self.assertRaises(SystemExit, cli.buildParser().parse_args, base + ["--links", value])
            self.assertEqual(exit.code, 2)
            self.assertIn("argument --links: expected a number of links", err.getvalue().splitlines()[-1])
            self.assertIn(repr(value), err.getvalue())

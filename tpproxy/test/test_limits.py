"""
Tests for L{tpproxy.limits}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tpproxy.limits import HalfOpenCounter, sourcePrefix


class SourcePrefixTests(SynchronousTestCase):
    def test_prefixes(self) -> None:
        """
        IPv4 counts per address, IPv6 per /64, IPv4-mapped as IPv4, zone
        ids are ignored, and anything else is its own prefix.
        """
        self.assertEqual(sourcePrefix("192.0.2.7"), "192.0.2.7")
        self.assertEqual(sourcePrefix("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(sourcePrefix("2001:db8:1:2::ffff"), sourcePrefix("2001:db8:1:2:aaaa::1"))
        self.assertNotEqual(sourcePrefix("2001:db8:1:2::1"), sourcePrefix("2001:db8:1:3::1"))
        self.assertEqual(sourcePrefix("::ffff:192.0.2.7"), "192.0.2.7")
        self.assertEqual(sourcePrefix("fe80::1%eth0"), "fe80::/64")
        self.assertEqual(sourcePrefix("/run/tp.sock"), "/run/tp.sock")


class HalfOpenCounterTests(SynchronousTestCase):
    def test_perSource(self) -> None:
        """
        A prefix at its cap is refused while others are admitted; a release
        makes room again, and an empty prefix is forgotten.
        """
        counter = HalfOpenCounter(total=10, perSource=2)
        self.assertIsNone(counter.admit("a"))
        self.assertIsNone(counter.admit("a"))
        self.assertEqual(counter.admit("a"), "too many unfinished handshakes from a (2)")
        self.assertIsNone(counter.admit("b"))
        self.assertEqual(counter.count, 3)
        counter.release("a")
        self.assertIsNone(counter.admit("a"))
        counter.release("a")
        counter.release("a")
        counter.release("b")
        self.assertEqual((counter.count, counter.bySource), (0, {}))

    def test_total(self) -> None:
        """
        The total cap refuses every prefix once reached.
        """
        counter = HalfOpenCounter(total=2, perSource=5)
        self.assertIsNone(counter.admit("a"))
        self.assertIsNone(counter.admit("b"))
        self.assertEqual(counter.admit("c"), "too many unfinished handshakes (2)")
        self.assertEqual(counter.count, 2)
        self.assertNotIn("c", counter.bySource)

    def test_unmatchedRelease(self) -> None:
        """
        Releasing a place never taken is a bug, reported at once rather than
        turning the count negative.
        """
        counter = HalfOpenCounter(total=2, perSource=2)
        self.assertRaises(ValueError, counter.release, "a")
        self.assertEqual(counter.count, 0)


class TokenBucketTests(SynchronousTestCase):
    def test_burstThenRate(self) -> None:
        """
        A full bucket allows C{burst} at once, then C{rate} a second.
        """
        from tpproxy.limits import TokenBucket

        bucket = TokenBucket(rate=2, burst=3)
        self.assertEqual([bucket.take(100.0) for _ in range(4)], [True, True, True, False])
        self.assertFalse(bucket.take(100.4))
        self.assertTrue(bucket.take(100.5))
        self.assertFalse(bucket.take(100.5))
        self.assertEqual(sum(bucket.take(1000.0) for _ in range(10)), 3)


class RateLimitedLogTests(SynchronousTestCase):
    def test_countsSuppressed(self) -> None:
        """
        The first event is reported at once; those within the interval are
        counted into the next report.
        """
        from tpproxy.limits import RateLimitedLog

        limited = RateLimitedLog(interval=10)
        self.assertEqual(limited.due(0.0), 1)
        self.assertEqual([limited.due(t) for t in (1.0, 2.0, 9.9)], [None, None, None])
        self.assertEqual(limited.due(10.0), 4)
        self.assertIsNone(limited.due(15.0))

"""
The committed SSH demo bundle is the one web/README.md records (web/check.sh
rebuilds it from the lockfile and compares byte for byte; it needs npm and
the registry, so it is run by hand, not here).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tpproxy.web.site import STATIC

WEB = Path(__file__).resolve().parents[2] / "web"


def _requireCheckout(path: Path) -> None:
    if path.exists():
        return
    if os.environ.get("CI") == "true":
        raise AssertionError(f"{path} is missing: CI runs in a source checkout")
    raise SkipTest("not a source checkout (web/ is not installed)")


class BundleTests(SynchronousTestCase):
    def test_recordedHashes(self) -> None:
        """
        Each built file's sha256 is the one web/README.md gives: a hand
        edit of the bundle (or a rebuild not recorded) fails here.
        """
        readme = WEB / "README.md"
        _requireCheckout(readme)
        recorded = dict((name, digest) for digest, name in re.findall(r"sha256 ([0-9a-f]{64})\s+(\S+)", readme.read_text()))
        self.assertEqual(sorted(recorded), ["ssh-demo.js", "xterm.css"])
        for name, digest in recorded.items():
            self.assertEqual(hashlib.sha256((Path(STATIC) / name).read_bytes()).hexdigest(), digest, name)

    def test_lockfilePinsEveryPackage(self) -> None:
        """
        Every package in the lockfile has an exact version and an integrity
        hash, so npm ci builds from the same bytes.
        """
        import json

        lock = WEB / "package-lock.json"
        _requireCheckout(lock)
        packages = json.loads(lock.read_text())["packages"]
        for path, entry in packages.items():
            if not path:
                continue
            self.assertRegex(entry.get("version", ""), r"^\d+\.\d+\.\d+", path)
            self.assertTrue(entry.get("integrity", "").startswith("sha512-"), path)

"""
The deployment files: the systemd unit in tac/ is valid for systemd, and
docs/operations.md shows the same unit.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tpproxy.test.support import requireTool, run

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "tac" / "tp.service"


class SystemdUnitTests(TestCase):
    def unitText(self) -> str:
        if not UNIT.exists():
            self.fail(f"{UNIT} is missing")
        return UNIT.read_text()

    def test_docsShowTheUnit(self) -> None:
        """
        The unit in docs/operations.md is tac/tp.service (without its
        comment header).
        """
        unit = "".join(line for line in self.unitText().splitlines(keepends=True) if not line.startswith("#"))
        docs = (ROOT / "docs" / "operations.md").read_text()
        start = docs.index("```ini\n") + len("```ini\n")
        self.assertEqual(docs[start : docs.index("```", start)], unit)

    @defer.inlineCallbacks
    def test_systemdAccepts(self) -> Any:
        """
        C{systemd-analyze verify} accepts the unit, with C{ExecStart}
        pointing at this venv's twist (the unit's own path is where an
        install would put it).
        """
        analyze = requireTool("systemd-analyze")
        twist = Path(sys.executable).with_name("twist")
        text = self.unitText().replace("/opt/tp/.venv/bin/twist", str(twist))
        path = Path(self.mktemp())
        path.mkdir()
        unit = path / "tp.service"
        unit.write_text(text)
        result = yield run([analyze, "verify", str(unit)])
        self.assertEqual(result.status, 0, result.err.decode())
        self.assertNotIn(b"tp.service", result.err)

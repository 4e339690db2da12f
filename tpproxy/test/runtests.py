"""
Run trial over TP's tests and end with the summary line CI reads:
C{tests: N passed, N failed, N skipped}.  Arguments are trial's (default:
the whole C{tpproxy} package).  Exit status 0 only if nothing failed.
"""

from __future__ import annotations

import sys

from twisted.scripts import trial


def main(argv: list[str]) -> int:
    config = trial.Options()
    config.parseOptions(argv or ["tpproxy"])
    runner = trial._makeRunner(config)
    suite = trial._getSuite(config)
    result = runner.run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skips)
    passed = result.successes
    print(f"tests: {passed} passed, {failed} failed, {skipped} skipped")
    return 0 if failed == 0 and result.testsRun > 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

# -*- test-case-name: tpproxy.test.test_logbridge -*-
"""
aioquic's own log records, through C{twisted.logger}.

aioquic logs with the standard library's C{logging}, on the loggers
C{quic} and C{http3}.  Nothing configures C{logging} in TP, so its last
resort handler wrote every warning (such as C{[95fa...] Error: 298,
reason: ...} when a peer closes a connection with an error) to standard
error: in the middle of C{tp}'s one status line, and as C{[stderr#error]}
lines in the server's log.  TP reports those events itself, in its own
words and in the audit log.

L{install} gives these loggers one handler that re-emits each record as a
C{twisted.logger} event at level C{debug}, in the logger's name as
namespace, and stops them propagating to the root logger.  Their level is
left alone: records below C{warning} are not even made unless someone sets
a lower level (C{logging.getLogger("quic").setLevel(logging.DEBUG)}).

C{tp} (L{tpproxy.cli.main}) and C{twist tp} (L{tpproxy.tap.makeService})
install it as they start.
"""

from __future__ import annotations

import logging

from twisted.logger import Logger

#: The standard library loggers of aioquic.
AIOQUIC_LOGGERS = ("quic", "http3")


class TwistedLoggerHandler(logging.Handler):
    """
    A C{logging} handler that logs each record as a C{twisted.logger}
    event at level C{debug}.

    The event's namespace is the record's logger name; it carries the
    message as C{text} and the record's level name as C{stdlib_level}.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            # A bad format string in the library: keep what we have.
            text = f"{record.msg!r} % {record.args!r}"
        Logger(namespace=record.name).debug(
            "{text}",
            text=text,
            stdlib_level=record.levelname,
        )


_handler: TwistedLoggerHandler | None = None


def install() -> TwistedLoggerHandler:
    """
    Route aioquic's loggers through L{TwistedLoggerHandler}, once.

    @return: the handler (the same one on every call).
    """
    global _handler
    if _handler is None:
        _handler = TwistedLoggerHandler()
        for name in AIOQUIC_LOGGERS:
            stdlib = logging.getLogger(name)
            stdlib.addHandler(_handler)
            stdlib.propagate = False
    return _handler

# -*- test-case-name: tpproxy.test.test_tap -*-
"""
C{twist tp}: the server's command line.
"""

from __future__ import annotations

import os

from twisted.application import service
from twisted.python import usage

from tpproxy.config import ConfigError, loadServerConfig
from tpproxy.reactors import IServerReactor


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = (
        "Run the TP server.  With --config (or TP_CONFIG), it reads that TOML file; "
        "with neither it runs on an embedded development default: a dev CA, server and "
        "client certificates and configs made on first run under $TP_HOME "
        "(default ~/.local/share/tp/dev), serving on 127.0.0.1 and ::1 port 8443."
    )
    optParameters = [
        ["config", "c", None, "Server configuration file (TOML). Default: $TP_CONFIG, else the dev default."],
    ]

    def postOptions(self) -> None:
        path = self["config"] or os.environ.get("TP_CONFIG")
        try:
            if path:
                self["serverConfig"] = loadServerConfig(path)
            else:
                from tpproxy.devenv import ensureDevEnvironment

                home = ensureDevEnvironment()
                self["serverConfig"] = loadServerConfig(home / "server.toml")
                self["devHome"] = home
        except ConfigError as e:
            raise usage.UsageError(f"bad configuration: {e}") from None


def makeService(options: Options, reactor: IServerReactor | None = None) -> service.IService:
    from tpproxy import logbridge
    from tpproxy.service import makeService as _make

    logbridge.install()  # aioquic's log lines go to the log, not to [stderr#error]

    svc = _make(options["serverConfig"], reactor)
    home = options.get("devHome")
    if home is not None:
        from tpproxy.devenv import announce

        announce(home)
    return svc

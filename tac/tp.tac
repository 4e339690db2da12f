# Run with:  TP_CONFIG=/etc/tp/server.toml twistd -ny tac/tp.tac
# With TP_CONFIG unset it runs the embedded dev default (see README).
from twisted.application import service

from tpproxy.tap import Options, makeService

options = Options()
options.parseOptions([])  # reads TP_CONFIG, or makes the dev default
application = service.Application("tp")
makeService(options).setServiceParent(application)

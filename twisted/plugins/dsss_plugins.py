"""twistd dropins: `twistd dsss-server` and `twistd dsss-agent`.

Only ServiceMakers live here; Options and makeService are in the tap modules, imported lazily.
"""

from twisted.application.service import ServiceMaker

dsss_server = ServiceMaker("dsss-server", "dsss.server.tap", "DSSS discovery server", "dsss-server")
dsss_agent = ServiceMaker("dsss-agent", "dsss.agent.tap", "DSSS storage agent", "dsss-agent")

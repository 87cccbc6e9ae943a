"""The gateway's uvicorn server: graceful drain on SIGTERM/SIGINT.

uvicorn stops accepting connections at the first signal and waits for in-flight requests. This server also tells
the gateway, which then answers /ready with 503 (so a load balancer stops sending) and, once ``drain_s`` has
passed, ends whatever is still running with an explicit error (streams: an error event, then ``data: [DONE]``)
instead of letting it be cut. A second signal exits at once (uvicorn's behaviour).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from gateway.app import Gateway

log = logging.getLogger("gateway")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.loop is not None and not self.should_exit:
            log.info("shutting down: in-flight calls get %g s (gateway.drain_s)", self.gateway.settings.gateway.drain_s)
            self.loop.call_soon_threadsafe(self.gateway.begin_drain)
        super().handle_exit(sig, frame)

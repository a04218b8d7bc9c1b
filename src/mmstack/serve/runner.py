"""Run the app with uvicorn: in the foreground (``mmstack serve``) or in a background thread
(``LiveServer``: tests, benchmarks and notebooks talk to a real socket on the loopback interface)."""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

from mmstack.errors import ServeError


def run(app: Any, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted (Ctrl-C stops it cleanly: queued requests are failed with 503)."""
    import uvicorn

    freeze_heap()
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def freeze_heap() -> None:
    """Move everything loaded so far (models, libraries) out of the garbage collector's sight.

    Those objects live as long as the server; without this, each full collection walks millions of them
    and stalls every request in flight (about 1 s under load on the 2-core machine).
    """
    gc.collect()
    gc.freeze()


class LiveServer:
    """``app`` served by uvicorn in a daemon thread on ``host`` (loopback) and a free port.

    with LiveServer(app) as server:
        httpx.get(server.url + "/healthz")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on")
        self.server = uvicorn.Server(config)
        self.host = host
        self.port = port
        self._thread = threading.Thread(target=self.server.run, name="mmstack-live-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServeError(f"the server did not start on {self.host}:{self.port} within {timeout_s} s")
            time.sleep(0.02)
        sockets = [s for srv in self.server.servers for s in srv.sockets]
        self.port = int(sockets[0].getsockname()[1])
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

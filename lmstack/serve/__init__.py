"""An OpenAI-compatible HTTP server over the inference engine (`lmstack serve`).

    from lmstack.serve import ServeConfig, build_app, run
    run(build_app(functools.partial(LLM, "path/to/model"), ServeConfig(port=8000), "my-model"))

See docs/serving.md for the routes, limits, metrics and a client example.
"""

from __future__ import annotations

import signal
import sys
import threading

import uvicorn

from lmstack.serve.app import build_app
from lmstack.serve.config import ServeConfig

__all__ = ["ServeConfig", "build_app", "run", "server"]


# A thread that gives up the GIL (the engine thread with engine_process=False, at every torch
# op; the engine process's pipe reader, at every message) must win it back from the event loop;
# Python's default 5 ms switch interval lets that wait stretch a step or delay its outputs.
GIL_SWITCH_S = 0.001


class _Server(uvicorn.Server):
    """uvicorn's server, turning /health to 503 as soon as a signal asks it to stop, and
    stopping if the model fails to load."""

    def __init__(self, config: uvicorn.Config, state):
        super().__init__(config)
        self.lmstack_state = state

    def handle_exit(self, sig, frame) -> None:
        self.lmstack_state.status = "draining"
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.lmstack_state.status == "failed":  # the model did not load: nothing to serve
            self.should_exit = True
        return await super().on_tick(counter)


def server(app, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for an app of build_app, on its ServeConfig's host and port. On SIGTERM
    or SIGINT it stops accepting connections, lets in-flight requests finish for up to
    drain_timeout_s, aborts the rest and returns."""
    state = app.state.lmstack
    c = state.config
    options = uvicorn.Config(app, host=c.host, port=c.port, log_level=log_level,
                             timeout_graceful_shutdown=c.drain_timeout_s, access_log=False)
    return _Server(options, state)


def run(app, log_level: str = "info") -> None:
    """Serve until SIGTERM or SIGINT. uvicorn raises the signal again once it has drained, to
    end the process the signal's way; SIGTERM's handler here is a no-op, so a drained server
    returns and the process exits 0."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda sig, frame: None)
    sys.setswitchinterval(GIL_SWITCH_S)
    server(app, log_level).run()

"""EngineLoop: the one thread that owns the `LLM`; HTTP handlers talk to it through messages.

Handlers run on the asyncio event loop and never touch the engine. They `submit` requests
(the loop thread validates and queues them between steps, and the handler awaits the answer),
`abort` them, and ask for prompt logprobs (computed between steps); the loop thread steps the engine while anything is unfinished and hands each
step's outputs back to the event loop in one call, where they go to the queue of the HTTP
request they belong to (one queue per HTTP request, shared by its `n` choices).

If a step raises, the loop stops, every waiting handler gets the error and /health turns 503.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from lmstack.infer import LLM, RequestOutput, SamplingParams, TokenLogprob
from lmstack.infer.structured import Constraint
from lmstack.serve.metrics import ServerMetrics

log = logging.getLogger("lmstack.serve")


@dataclass
class Submission:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    constraint: Constraint | None = None


class EngineDied(RuntimeError):
    """The engine loop stopped on an error; the server cannot answer until restarted."""


class EngineLoop:
    def __init__(self, llm: LLM, metrics: ServerMetrics, idle_wait_s: float = 0.5):
        self.llm, self.metrics = llm, metrics
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sinks: dict[str, asyncio.Queue] = {}  # engine request id -> its HTTP request's queue
        self.idle_wait_s = idle_wait_s
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmstack-engine", daemon=True)
        self._events: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------------- event-loop side

    def start(self) -> None:
        self._events = asyncio.get_running_loop()
        self._thread.start()

    def stop(self) -> None:
        """Abort whatever is left and end the thread."""
        self._stop.set()
        self.inbox.put(("wake",))
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def num_requests(self) -> int:
        """Engine requests submitted and not finished (running or waiting)."""
        return len(self.sinks)

    async def submit(self, subs: list[Submission], sink: asyncio.Queue) -> None:
        """Queue requests that share one output queue; ValueError if the engine refuses one
        (then none of them runs)."""
        if not self.alive:
            raise EngineDied(f"the engine loop has stopped: {self.error!r}")
        for s in subs:
            self.sinks[s.request_id] = sink
        done: Future = Future()
        self.inbox.put(("add", subs, done))
        try:
            await asyncio.wrap_future(done)
        except BaseException:
            for s in subs:
                self.sinks.pop(s.request_id, None)
            raise

    async def prompt_logprobs(self, prompt: list[int], n: int) -> list[TokenLogprob | None]:
        """LLM.prompt_logprobs, run by the loop thread between steps; ValueError if refused."""
        if not self.alive:
            raise EngineDied(f"the engine loop has stopped: {self.error!r}")
        done: Future = Future()
        self.inbox.put(("score", prompt, n, done))
        return await asyncio.wrap_future(done)

    def abort(self, request_ids: list[str]) -> None:
        """Stop these requests (a client went away): their KV blocks are freed before the next step."""
        live = [r for r in request_ids if self.sinks.pop(r, None) is not None]
        if live:
            self.inbox.put(("abort", live))

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            sink = self.sinks.get(out.request_id)
            if sink is None:
                continue  # aborted while the step ran
            if out.finished:
                del self.sinks[out.request_id]
            sink.put_nowait(out)

    def _fail_all(self, error: BaseException) -> None:
        unique = {id(sink): sink for sink in self.sinks.values()}
        for sink in unique.values():
            sink.put_nowait(EngineDied(f"the engine loop stopped: {error!r}"))
        self.sinks.clear()

    # ------------------------------------------------------------------------- engine thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._handle_inbox(block=not self.llm.has_unfinished())
                if self.llm.has_unfinished() and not self._stop.is_set():
                    outs = self.llm.step()
                    self.metrics.after_step(self.llm, outs)
                    if outs:
                        self._events.call_soon_threadsafe(self._deliver, outs)
        except BaseException as e:  # the loop must report, not vanish: the handlers are waiting
            log.exception("the engine loop failed")
            self.error = e
            self._events.call_soon_threadsafe(self._fail_all, e)
        finally:
            for request_id in list(self.llm.requests):
                self.llm.abort(request_id)

    def _handle_inbox(self, block: bool) -> None:
        try:
            message = self.inbox.get(timeout=self.idle_wait_s) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(message)
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, message: tuple) -> None:
        if message[0] == "add":
            _, subs, done = message
            try:
                self._add_all(subs)
                done.set_result(None)
            except ValueError as e:
                done.set_exception(e)
        elif message[0] == "score":
            _, prompt, n, done = message
            try:
                done.set_result(self.llm.prompt_logprobs(prompt, n))
            except ValueError as e:
                done.set_exception(e)
        elif message[0] == "abort":
            for request_id in message[1]:
                out = self.llm.abort(request_id)
                if out is not None:
                    self.metrics.finished(out)
            self.metrics.engine_state(self.llm)

    def _add_all(self, subs: list[Submission]) -> None:
        added = []
        try:
            for s in subs:
                added.append(self.llm.add_request(s.prompt, s.params, s.request_id, s.constraint))
        except ValueError:
            for request_id in added:
                self.llm.abort(request_id)
            raise
        for s in subs:
            self.metrics.admitted(len(s.prompt))

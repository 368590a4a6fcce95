"""The engine's two halves: `EngineCore`, which owns the `LLM` and steps it, and `EngineLoop`,
the side the HTTP handlers talk to. They only exchange messages.

By default the core runs in a process of its own (`ProcessEngine`): the handlers' Python (JSON,
server-sent events) and the engine's (scheduling, module calls) then run on two cores instead
of taking turns on one GIL, where the engine, which gives the GIL up at every torch op, waits
for it after each one while the handlers are busy. `ThreadEngine` runs the core in a thread of
the server's process, for a model that is built in the caller's process (a `load` that cannot
be sent to another one).

Handlers never touch the engine. They `submit` requests (the core validates and queues them
between steps; the handler awaits the answer), `abort` them, and ask for prompt logprobs or the
engine's stats (answered between steps). The core steps the engine while anything is unfinished
and sends each step's outputs back in one message, which the event loop hands to the queue of
the HTTP request they belong to (one queue per HTTP request, shared by its `n` choices).

Messages to the core:    ("add", call, subs) ("score", call, prompt, n) ("stats", call)
                         ("abort", request_ids) ("stop",)
Messages from the core:  ("reply", call, result, error) ("step", outputs, stats)
                         ("aborted", outputs, stats) ("failed", why)
If a step raises (or the engine process dies), every waiting handler gets EngineDied and
/health turns 503.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass

from lmstack.infer import LLM, RequestMetrics, RequestOutput, SamplingParams, TokenLogprob
from lmstack.infer.structured import Constraint
from lmstack.serve.metrics import ServerMetrics

log = logging.getLogger("lmstack.serve")


@dataclass
class Submission:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    constraint: Constraint | None = None
    """The request's structured-output constraint, built by the server (ThreadEngine)..."""
    grammar: str | None = None
    """...or the grammar the engine process builds it from (ProcessEngine: a constraint holds a
    live matcher, which does not cross processes)."""


@dataclass
class EngineInfo:
    """What the routes need to know about the engine, wherever it runs."""

    tokenizer: object
    max_model_len: int
    max_num_seqs: int
    vocab_size: int
    """The model's logit width (structured-output masks cover all of it)."""

    @classmethod
    def of(cls, llm: LLM) -> EngineInfo:
        return cls(llm.tokenizer, llm.max_model_len, llm.config.max_num_seqs,
                   llm.model.config.vocab_size)


class EngineDied(RuntimeError):
    """The engine stopped on an error; the server cannot answer until restarted."""


def engine_stats(llm: LLM) -> dict[str, float]:
    """llm.stats() and the number of requests it holds (finished ones leave at once)."""
    return {**llm.stats(), "num_requests": len(llm.requests)}


# ----------------------------------------------------------------------------- the core

class EngineCore:
    """Owns the LLM: answers messages from its inbox between steps, steps while anything is
    unfinished, and sends what happens through `emit`."""

    def __init__(self, llm: LLM, emit: Callable[[tuple], None], idle_wait_s: float = 0.5):
        self.llm, self.emit, self.idle_wait_s = llm, emit, idle_wait_s

    def run(self, inbox: queue.SimpleQueue) -> None:
        """Until a "stop" message (or an error, reported as "failed"); aborts what is left."""
        try:
            while self._handle_inbox(inbox, block=not self.llm.has_unfinished()):
                if self.llm.has_unfinished():
                    outs = self.llm.step()
                    self.emit(("step", outs, engine_stats(self.llm)))
        except BaseException as e:  # the core must report, not vanish: the handlers are waiting
            log.exception("the engine loop failed")
            self.emit(("failed", repr(e)))
        finally:
            for request_id in list(self.llm.requests):
                self.llm.abort(request_id)

    def _handle_inbox(self, inbox: queue.SimpleQueue, block: bool) -> bool:
        """Handle every waiting message (waiting a while for one if `block`); False on "stop"."""
        try:
            message = inbox.get(timeout=self.idle_wait_s) if block else inbox.get_nowait()
        except queue.Empty:
            return True
        while message[0] != "stop":
            self._handle(message)
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                return True
        return False

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "abort":
            outs = [out for r in message[1] if (out := self.llm.abort(r)) is not None]
            self.emit(("aborted", outs, engine_stats(self.llm)))
            return
        answer = {"add": lambda subs: self._add_all(subs),
                  "score": lambda prompt, n: self.llm.prompt_logprobs(prompt, n),
                  "stats": lambda: engine_stats(self.llm)}[kind]  # another kind is a bug: "failed"
        call = message[1]
        try:
            result = answer(*message[2:])
        except ValueError as e:  # the engine refused the request: the handler answers 400
            self.emit(("reply", call, None, e))
        else:
            self.emit(("reply", call, result, None))

    def _add_all(self, subs: list[Submission]) -> None:
        added = []
        try:
            for s in subs:
                added.append(self.llm.add_request(s.prompt, s.params, s.request_id, s.constraint))
        except ValueError:
            for request_id in added:
                self.llm.abort(request_id)
            raise


# ----------------------------------------------------------------------------- the handlers' side

class EngineLoop:
    """What the handlers call (on the event loop). Subclasses start the core somewhere and
    carry messages to it (`_send`); messages back reach `_on_message` on the event loop."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.sinks: dict[str, asyncio.Queue] = {}  # engine request id -> its HTTP request's queue
        self.error: str | None = None
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._events: asyncio.AbstractEventLoop | None = None

    async def start(self, load: Callable[[], LLM]) -> EngineInfo:
        """Build the engine with `load` and start the core; raises what loading raised."""
        raise NotImplementedError

    def stop(self) -> None:
        """Abort whatever is left and end the core (blocks: call it from a worker thread)."""
        raise NotImplementedError

    def _send(self, message: tuple) -> None:
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    @property
    def num_requests(self) -> int:
        """Engine requests submitted and not finished (running or waiting)."""
        return len(self.sinks)

    async def submit(self, subs: list[Submission], sink: asyncio.Queue) -> None:
        """Queue requests that share one output queue; ValueError if the engine refuses one
        (then none of them runs)."""
        for s in subs:
            self.sinks[s.request_id] = sink
        try:
            await self._call("add", subs)
        except BaseException:
            for s in subs:
                self.sinks.pop(s.request_id, None)
            raise
        for s in subs:
            self.metrics.admitted(len(s.prompt))

    async def prompt_logprobs(self, prompt: list[int], n: int) -> list[TokenLogprob | None]:
        """LLM.prompt_logprobs, run by the core between steps; ValueError if refused."""
        return await self._call("score", prompt, n)

    async def stats(self) -> dict[str, float]:
        """The engine's block and request counts (engine_stats), taken between steps."""
        return await self._call("stats")

    def stats_from_thread(self, timeout: float = 30) -> dict[str, float]:
        """stats() for a caller on another thread than the event loop (a test, a debugger)."""
        return asyncio.run_coroutine_threadsafe(self.stats(), self._events).result(timeout)

    def abort(self, request_ids: list[str]) -> None:
        """Stop these requests (a client went away): their KV blocks are freed before the next step."""
        live = [r for r in request_ids if self.sinks.pop(r, None) is not None]
        if live and self.alive:
            self._send(("abort", live))

    async def _call(self, kind: str, *args):
        if not self.alive:
            raise EngineDied(f"the engine has stopped: {self.error}")
        call = next(self._call_ids)
        answer = self._calls[call] = self._events.create_future()
        self._send((kind, call, *args))
        try:
            return await answer
        finally:
            self._calls.pop(call, None)

    def _on_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "step":
            _, outs, stats = message
            self.metrics.after_step(stats, outs)
            self._deliver(outs)
        elif kind == "aborted":
            _, outs, stats = message
            for out in outs:
                self.metrics.finished(out)
            self.metrics.engine_state(stats)
        elif kind == "reply":
            _, call, result, error = message
            answer = self._calls.get(call)
            if answer is not None and not answer.done():
                answer.set_result(result) if error is None else answer.set_exception(error)
        elif kind == "failed":
            self._fail(message[1])

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            sink = self.sinks.get(out.request_id)
            if sink is None:
                continue  # aborted while the step ran
            if out.finished:
                del self.sinks[out.request_id]
            sink.put_nowait(out)

    def _fail(self, why: str) -> None:
        if self.error is not None:
            return
        self.error = why
        died = EngineDied(f"the engine stopped: {why}")
        for sink in {id(sink): sink for sink in self.sinks.values()}.values():
            sink.put_nowait(died)
        self.sinks.clear()
        for answer in self._calls.values():
            if not answer.done():
                answer.set_exception(died)


class ThreadEngine(EngineLoop):
    """The core in a thread of the server's process."""

    def __init__(self, metrics: ServerMetrics):
        super().__init__(metrics)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def start(self, load: Callable[[], LLM]) -> EngineInfo:
        self._events = asyncio.get_running_loop()
        llm = await asyncio.to_thread(load)
        core = EngineCore(llm, lambda m: self._events.call_soon_threadsafe(self._on_message, m))
        self._thread = threading.Thread(target=core.run, args=(self._inbox,), name="lmstack-engine",
                                        daemon=True)
        self._thread.start()
        return EngineInfo.of(llm)

    def stop(self) -> None:
        self._inbox.put(("stop",))
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _send(self, message: tuple) -> None:
        self._inbox.put(message)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None


class ProcessEngine(EngineLoop):
    """The core in a child process (spawned: no state of the server's process is inherited,
    so `load` must pickle, e.g. functools.partial(LLM, path, ...)). Messages go through two
    pipes; a reader thread here hands what arrives to the event loop. The child ignores SIGINT
    and SIGTERM (the server drains, then stops it) and exits when the server's end of the pipe
    closes.

    Outputs cross as `WireOutput`s, what is new since the last one, and are made whole again
    here (`Assembler`): a RequestOutput repeats the prompt and everything generated so far,
    which would make a long request's pickling grow with every step."""

    def __init__(self, metrics: ServerMetrics, grammar_cache_size: int = 256):
        super().__init__(metrics)
        self.grammar_cache_size = grammar_cache_size
        self._process = None
        self._stopping = self._ready = False
        self._assembler = Assembler()

    async def submit(self, subs: list[Submission], sink: asyncio.Queue) -> None:
        for s in subs:
            self._assembler.begin(s.request_id, s.prompt)
        try:
            await super().submit(subs, sink)
        except BaseException:
            for s in subs:
                self._assembler.forget(s.request_id)
            raise

    def _on_message(self, message: tuple) -> None:
        if message[0] in ("step", "aborted"):
            kind, wires, stats = message
            message = (kind, [self._assembler.output(w) for w in wires], stats)
        super()._on_message(message)

    async def start(self, load: Callable[[], LLM]) -> EngineInfo:
        self._events = asyncio.get_running_loop()
        spawn = multiprocessing.get_context("spawn")
        self._from_core, core_out = spawn.Pipe(duplex=False)
        core_in, self._to_core = spawn.Pipe(duplex=False)
        self._process = spawn.Process(target=_core_process, name="lmstack-engine", daemon=True,
                                      args=(load, core_in, core_out, self.grammar_cache_size))
        try:
            self._process.start()
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            raise ValueError(f"the model's loader cannot be sent to the engine process ({e}): "
                             "give one that pickles, such as functools.partial(LLM, path, ...), "
                             "or run the engine in a thread (engine_process=False)") from None
        core_in.close()
        core_out.close()
        try:
            kind, detail = await asyncio.to_thread(self._from_core.recv)
        except EOFError:
            self._process.join(5)
            raise RuntimeError(f"the engine process exited while loading (code "
                               f"{self._process.exitcode})") from None
        if kind != "ready":
            raise RuntimeError(f"loading the model failed in the engine process: {detail}")
        self._ready = True
        threading.Thread(target=self._read, name="lmstack-engine-reader", daemon=True).start()
        return detail

    def _read(self) -> None:
        try:
            while True:
                message = self._from_core.recv()
                self._events.call_soon_threadsafe(self._on_message, message)
        except (EOFError, OSError):
            if not self._stopping:
                self._process.join(5)
                why = f"the engine process exited (code {self._process.exitcode})"
                self._events.call_soon_threadsafe(self._fail, why)

    def stop(self) -> None:
        if self._process is None:
            return
        self._stopping = True
        if self._ready:  # else it is still loading: nothing to finish
            try:
                self._to_core.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)

    def _send(self, message: tuple) -> None:
        try:
            self._to_core.send(message)
        except (BrokenPipeError, OSError):  # the process died; the reader reports it
            pass

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive() and self.error is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid


@dataclass
class WireOutput:
    """A RequestOutput less what the server already has: its prompt and what earlier outputs
    of the request carried (the text and token ids so far, their logprobs)."""

    request_id: str
    delta_token_ids: list[int]
    delta_text: str
    delta_logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None
    metrics: RequestMetrics
    stop_reason: str | int | None

    @classmethod
    def of(cls, out: RequestOutput) -> WireOutput:
        lps = out.logprobs
        new = None if lps is None else lps[len(out.token_ids) - len(out.delta_token_ids):]
        return cls(out.request_id, out.delta_token_ids, out.delta_text, new, out.finished,
                   out.finish_reason, out.metrics, out.stop_reason)


class Assembler:
    """RequestOutputs from WireOutputs: each request's prompt (given at submission) and what
    its outputs carried so far. The engine's text is the concatenation of its deltas (it holds
    back a stop string's length until it knows), so the sums are the engine's own fields."""

    def __init__(self):
        self._so_far: dict[str, RequestOutput] = {}

    def begin(self, request_id: str, prompt: list[int]) -> None:
        self._so_far[request_id] = RequestOutput(request_id, prompt, [], "", [], "", False, None,
                                                 None, None)

    def forget(self, request_id: str) -> None:
        self._so_far.pop(request_id, None)

    def output(self, w: WireOutput) -> RequestOutput:
        last = self._so_far.pop(w.request_id) if w.finished else self._so_far[w.request_id]
        logprobs = None if w.delta_logprobs is None else (last.logprobs or []) + w.delta_logprobs
        out = RequestOutput(w.request_id, last.prompt_token_ids, last.token_ids + w.delta_token_ids,
                            last.text + w.delta_text, w.delta_token_ids, w.delta_text, w.finished,
                            w.finish_reason, w.metrics, logprobs, w.stop_reason)
        if not w.finished:
            self._so_far[w.request_id] = out
        return out


def _core_process(load: Callable[[], LLM], inbox_conn, outbox_conn, grammar_cache_size: int) -> None:
    """The engine process: load, say "ready" (with EngineInfo), then run the core. A reader
    thread moves messages from the pipe to the core's inbox and builds the constraints of
    structured-output requests there, off the step loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        llm = load()
    except BaseException as e:
        outbox_conn.send(("load_failed", repr(e)))
        return
    lock = threading.Lock()

    def emit(message: tuple) -> None:
        if message[0] in ("step", "aborted"):
            kind, outs, stats = message
            message = (kind, [WireOutput.of(out) for out in outs], stats)
        with lock:
            outbox_conn.send(message)

    inbox: queue.SimpleQueue = queue.SimpleQueue()
    info = EngineInfo.of(llm)
    threading.Thread(target=_receive, args=(inbox_conn, inbox, emit, info, grammar_cache_size),
                     name="lmstack-engine-inbox", daemon=True).start()
    emit(("ready", info))
    EngineCore(llm, emit).run(inbox)


def _receive(conn, inbox: queue.SimpleQueue, emit: Callable[[tuple], None], info: EngineInfo,
             grammar_cache_size: int) -> None:
    compiler = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server is gone
            inbox.put(("stop",))
            return
        if message[0] == "add" and any(s.grammar is not None for s in message[2]):
            try:
                if compiler is None:
                    from lmstack.infer.structured import GrammarCompiler
                    compiler = GrammarCompiler(info.tokenizer, info.vocab_size, grammar_cache_size)
                for s in message[2]:
                    if s.grammar is not None:
                        s.constraint = compiler.constraint(s.grammar)
            except (ValueError, ImportError) as e:
                emit(("reply", message[1], None, ValueError(str(e))))
                continue
        inbox.put(message)
        if message[0] == "stop":
            return

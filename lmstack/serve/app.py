"""The FastAPI app: OpenAI routes over one EngineLoop.

    app = build_app(functools.partial(LLM, "path/to/model"), ServeConfig(api_key="k"))
    uvicorn.run(app, host="127.0.0.1", port=8000)   # or serve(...)

The model loads once the server is up, in the engine's own process (`load` is sent there, so
it must pickle) or, with `engine_process=False`, in a worker thread; /health answers 503
("loading") until it is ready. A request's path: the body is checked (protocol.py, requests.py), the queue
bound is checked (429), its grammar is compiled in a worker thread (structured outputs), its
choices are submitted to the engine loop, and their outputs come back on one queue, to be
streamed as server-sent events or gathered into one body. A client that goes away aborts its
requests, which frees their KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from lmstack.infer import LLM, RequestOutput
from lmstack.serve import responses as R
from lmstack.serve.config import ServeConfig
from lmstack.serve.errors import APIError, BodyLimit, error_response, install_handlers
from lmstack.serve.loop import (
    EngineDied,
    EngineInfo,
    EngineLoop,
    ProcessEngine,
    Submission,
    ThreadEngine,
)
from lmstack.serve.metrics import ServerMetrics
from lmstack.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from lmstack.serve.requests import Job, Limits, chat_job, completion_job, render_chat

log = logging.getLogger("lmstack.serve")


@dataclass
class Engine:
    """What the routes need once the model is loaded."""

    info: EngineInfo
    loop: EngineLoop
    limits: Limits
    compiler: object | None  # lmstack.infer.structured.GrammarCompiler, built at the first use

    @property
    def tokenizer(self):
        return self.info.tokenizer


class State:
    def __init__(self, config: ServeConfig, model_name: str):
        self.config, self.model_name = config, model_name
        self.metrics = ServerMetrics(model_name)
        self.engine: Engine | None = None
        self.loop: EngineLoop | None = None
        self.status = "loading"  # -> "ready" -> "draining"; "failed" if loading raised
        self.created = int(time.time())

    def ready(self) -> Engine:
        if self.status == "ready" and self.engine is not None:
            if self.engine.loop.alive:
                return self.engine
            raise APIError(503, f"the engine has stopped: {self.engine.loop.error}", code="engine_died")
        reason = {"loading": "the model is still loading", "draining": "the server is shutting down"}
        raise APIError(503, reason.get(self.status, "the engine is not running"), code=self.status)


def build_app(load: Callable[[], LLM], config: ServeConfig | None = None,
              model_name: str = "model") -> FastAPI:
    """The server's ASGI app; `load` builds the engine (it runs in a worker thread at start-up)."""
    config = config or ServeConfig()
    state = State(config, config.model_name or model_name)
    app = FastAPI(title="lmstack", lifespan=_lifespan(state, load))
    app.state.lmstack = state
    install_handlers(app)
    app.include_router(_v1_routes(state), dependencies=[Depends(_auth(config.api_key))])
    app.include_router(_other_routes(state))
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    return app


def _lifespan(state: State, load: Callable[[], LLM]):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_load(state, load))
        yield
        if state.status != "failed":  # (the command's exit code reads it)
            state.status = "draining"
        task.cancel()
        if state.loop is not None:
            await asyncio.to_thread(state.loop.stop)
    return lifespan


async def _load(state: State, load: Callable[[], LLM]) -> None:
    c = state.config
    loop = ProcessEngine(state.metrics, c.grammar_cache_size) if c.engine_process else ThreadEngine(state.metrics)
    state.loop = loop  # stopped at shutdown, even while it loads
    try:
        info = await loop.start(load)
    except Exception:
        log.exception("loading the model failed")
        state.status = "failed"
        return
    state.engine = Engine(info, loop, Limits(info.max_model_len, c), None)
    state.status = "ready"


def _auth(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                           code="invalid_api_key")
    return check


# ----------------------------------------------------------------------------- routes

def _v1_routes(state: State) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def models() -> dict:
        context = state.engine.limits.context if state.engine else None
        return {"object": "list", "data": [{"id": state.model_name, "object": "model",
                                            "created": state.created, "owned_by": "lmstack",
                                            "max_model_len": context}]}

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine = _engine_for(state, body.model)
        job = completion_job(body, engine.tokenizer, engine.limits, state.model_name)
        return await _respond(state, engine, job, request)

    @router.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        engine = _engine_for(state, body.model)
        job = chat_job(body, engine.tokenizer, engine.limits, state.model_name)
        return await _respond(state, engine, job, request)

    return router


def _other_routes(state: State) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health():
        try:
            state.ready()
        except APIError as e:
            return JSONResponse({"status": state.status, "detail": e.message}, 503)
        return {"status": "ok"}

    @router.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        engine = _engine_for(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if body.prompt is not None:
            ids = engine.tokenizer.encode(body.prompt)
        else:
            ids = render_chat(body.messages, engine.tokenizer)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.limits.context}

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        engine = _engine_for(state, body.model)
        V = engine.info.vocab_size
        if not all(0 <= t < V for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {V})", "tokens")
        return {"prompt": engine.tokenizer.decode(body.tokens)}

    return router


def _engine_for(state: State, model: str | None) -> Engine:
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server has "
                            f"{state.model_name!r}", "model", "model_not_found")
    return state.ready()


# ----------------------------------------------------------------------------- answering

async def _respond(state: State, engine: Engine, job: Job, request: Request):
    limit = engine.info.max_num_seqs + state.config.max_waiting
    if engine.loop.num_requests + job.num_choices > limit:
        raise APIError(429, f"the server is full ({engine.loop.num_requests} requests running or "
                            "waiting); retry shortly", code="queue_full", headers={"Retry-After": "1"})
    constraints = await _constraints(state, engine, job)
    if job.echo and job.logprobs is not None:
        job.prompt_logprobs = [await _prompt_logprobs(engine, p, job.logprobs) for p in job.prompts]
    subs = [Submission(job.request_id(k), job.prompts[k // job.n], p, constraints[k], job.grammar)
            for k, p in enumerate(job.params)]
    sink: asyncio.Queue = asyncio.Queue()
    try:
        await engine.loop.submit(subs, sink)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    except EngineDied as e:
        raise APIError(503, str(e), code="engine_died") from None
    ids = [s.request_id for s in subs]
    if job.stream:
        return StreamingResponse(_events(job, engine, sink, ids), media_type="text/event-stream")
    return await _gathered(job, engine, sink, ids, request)


async def _prompt_logprobs(engine: Engine, prompt: list[int], n: int) -> list:
    try:
        return await engine.loop.prompt_logprobs(prompt, n)
    except ValueError as e:
        raise APIError(400, str(e), "prompt") from None
    except EngineDied as e:
        raise APIError(503, str(e), code="engine_died") from None


async def _constraints(state: State, engine: Engine, job: Job) -> list:
    if job.grammar is None:
        return [None] * job.num_choices
    if engine.compiler is None:
        engine.compiler = await asyncio.to_thread(_make_compiler, engine.info, state.config)
    # a separate engine process builds its own constraints from the grammar: this one checks it
    count = 1 if state.config.engine_process else job.num_choices

    def build():  # compiling blocks for a while on a large schema: not on the event loop
        return [engine.compiler.constraint(job.grammar) for _ in range(count)]
    try:
        constraints = await asyncio.to_thread(build)
    except ValueError as e:
        raise APIError(400, str(e), job.grammar_param, "unsupported_schema") from None
    return [None] * job.num_choices if state.config.engine_process else constraints


def _make_compiler(info: EngineInfo, config: ServeConfig):
    from lmstack.infer.structured import GrammarCompiler

    try:
        return GrammarCompiler(info.tokenizer, info.vocab_size, config.grammar_cache_size)
    except ImportError:
        raise APIError(400, "structured outputs need llguidance (pip install llguidance)",
                       "response_format") from None


async def _next(sink: asyncio.Queue, index: dict[str, int]) -> list[tuple[int, RequestOutput]]:
    """Wait for outputs, then take every one already queued."""
    items = [await sink.get()]
    while not sink.empty():
        items.append(sink.get_nowait())
    for item in items:
        if isinstance(item, EngineDied):
            raise item
    return [(index[o.request_id], o) for o in items]


async def _gathered(job: Job, engine: Engine, sink: asyncio.Queue, ids: list[str],
                    request: Request):
    """Wait for every choice to finish; a client that disconnects first aborts them."""
    index = {r: k for k, r in enumerate(ids)}
    finals: dict[int, RequestOutput] = {}

    async def collect():
        while len(finals) < len(ids):
            finals.update((k, o) for k, o in await _next(sink, index) if o.finished)

    work, gone = asyncio.create_task(collect()), asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            engine.loop.abort(ids)
    if not work.done() or work.cancelled():  # nobody is listening; nginx's code for it
        return error_response(499, "the client closed the connection; its requests were aborted")
    if isinstance(work.exception(), EngineDied):
        raise APIError(503, str(work.exception()), code="engine_died")
    work.result()
    body = R.completion_body if job.kind == "text_completion" else R.chat_body
    return JSONResponse(body(job, finals, engine.tokenizer))


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(job: Job, engine: Engine, sink: asyncio.Queue,
                  ids: list[str]) -> AsyncIterator[str]:
    """The stream: a first chunk per choice (chat: the role; completions with echo: the
    prompt), content chunks, the usage chunk if asked for, then [DONE]."""
    index = {r: k for k, r in enumerate(ids)}
    finals: dict[int, RequestOutput] = {}
    tok = engine.tokenizer
    extra = {"usage": None} if job.include_usage else {}
    try:
        if job.kind == "chat.completion":
            for k in range(job.num_choices):
                yield R.sse({**R.chat_chunk(job, None, tok, k, role=True), **extra})
        echoed: set[int] = set()
        calls = {k: R.ToolCallStream(job) for k in range(job.num_choices)} if job.tool else None
        while len(finals) < len(ids):
            try:
                outs = await _next(sink, index)
            except EngineDied as e:
                yield R.sse({"error": {"message": str(e), "type": "server_error", "param": None,
                                       "code": "engine_died"}})
                return
            for d in R.merge(outs):
                if d.out.finished:
                    finals[d.index] = d.out
                for chunk in _chunks(job, d, tok, echoed, calls):
                    yield R.sse({**chunk, **extra})
        if job.include_usage:
            yield R.sse(R.usage_chunk(job, finals))
        yield R.sse("[DONE]")
    finally:
        engine.loop.abort([r for r in ids if index[r] not in finals])


def _chunks(job: Job, d: R.Delta, tok, echoed: set[int],
            calls: dict[int, R.ToolCallStream] | None) -> list[dict]:
    if calls is not None:
        return R.chat_chunks(job, d, tok, calls[d.index].deltas(d))
    if job.kind == "chat.completion":
        return [R.chat_chunk(job, d, tok)]
    prefix = ""
    if job.echo and d.index not in echoed:
        echoed.add(d.index)
        prefix = job.echo[d.index // job.n]
    return [R.completion_chunk(job, d, tok, prefix)]

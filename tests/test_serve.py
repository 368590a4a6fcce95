"""`lmstack serve` end to end: the real server on a free loopback port (uvicorn in a thread,
the engine in its own process, or in a thread where a test builds the engine itself), driven by the
official `openai` client and raw HTTP for bad input. The model is a tiny random Llama whose
embedding is wider than its tokenizer (padding ids)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import torch

from lmstack.infer import LLM, SamplingParams
from lmstack.model import ModelConfig, Transformer
from lmstack.model.tokenizer import Tokenizer
from lmstack.serve import ServeConfig, build_app, server

KEY = "sk-test"
NAME = "tiny"
TEXT = ["the quick brown fox jumps over the lazy dog", 'hello world, {"a": 1, "b": [true, null]}',
        "stop here. and then more text, stop again"] * 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_and_tokenizer():
    tok = Tokenizer.train(TEXT, vocab_size=300)
    config = ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size + 20, init_std=0.1,
                                     max_seq_len=256)
    return Transformer.build(config, seed=3).eval(), tok


@dataclass
class Running:
    url: str
    tokenizer: Tokenizer
    app: object

    @property
    def engine(self):
        """The server's EngineLoop (ProcessEngine or ThreadEngine)."""
        return self.app.state.lmstack.loop

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, **kw)

    def aclient(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)

    def metric(self, name: str, label: str = "") -> float:
        """The sum of a metric's samples whose labels contain `label`."""
        text = httpx.get(self.url + "/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and label in line)


@contextlib.contextmanager
def running_server(llm: LLM, **config):
    """A server over this engine object, which runs in a thread of this process."""
    with serving(lambda: llm, llm.tokenizer, engine_process=False, **config) as s:
        yield s


@contextlib.contextmanager
def serving(load, tokenizer: Tokenizer, **config):
    """A server whose engine `load` builds (in a process of its own unless engine_process=False)."""
    port = free_port()
    app = build_app(load, ServeConfig(port=port, api_key=KEY, **config), NAME)
    srv = server(app, log_level="warning")
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url)
        yield Running(url, tokenizer, app)
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def saved(model: Transformer, tok: Tokenizer, path):
    """The model and tokenizer as a directory LLM loads."""
    from safetensors.torch import save_file

    model.config.save(path / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    tok.save(path)
    return path


def slow_llm(path, step_s: float, **engine):
    """An LLM whose every step takes at least step_s (a loader the engine process can import)."""
    llm = LLM(path, **engine)
    step = llm.step

    def slow_step():
        time.sleep(step_s)
        return step()
    llm.step = slow_step
    return llm


def wait_healthy(url: str, timeout: float = 60) -> None:
    end = time.time() + timeout
    while time.time() < end:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health").status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url}/health never answered 200")


def wait_until(condition, timeout: float = 20) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model_and_tokenizer()


@pytest.fixture(scope="module")
def checkpoint(model_tok, tmp_path_factory):
    return saved(*model_tok, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def srv(model_tok, checkpoint):
    """The default server: the engine in its own process, loaded from the saved model."""
    load = functools.partial(LLM, str(checkpoint), block_size=8, max_num_seqs=16)
    with serving(load, model_tok[1], max_n=4) as s:
        yield s


@pytest.fixture(scope="module")
def reference(model_tok):
    """An in-process engine over the same model: what the server must return."""
    model, tok = model_tok
    return LLM(model, tok, block_size=8)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0)


def chat_ids(tok, content: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return tok.encode(text)


def assert_all_free(srv: Running) -> None:
    """No request and no used KV block left in the server's engine (asked between its steps)."""
    def free():
        stats = srv.engine.stats_from_thread()
        return stats["free_blocks"] == stats["num_blocks"] and stats["num_requests"] == 0
    assert wait_until(free)


# ----------------------------------------------------------------------------- the openai client

def test_models_health_and_tokenize(srv):
    models = srv.client().models.list()
    assert [m.id for m in models.data] == [NAME]
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    ids = httpx.post(srv.url + "/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    assert ids == srv.tokenizer.encode("hello world")
    back = httpx.post(srv.url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert back == "hello world"


def test_completion_equals_the_engine(srv, reference):
    want = reference.generate("the quick", greedy(12))[0]
    got = srv.client().completions.create(model=NAME, prompt="the quick", max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    assert got.id.startswith("cmpl-") and got.object == "text_completion" and got.created > 0


def test_completion_prompt_forms_and_echo(srv, reference):
    tok = srv.tokenizer
    ids = tok.encode("hello world")
    want = [o.text for o in reference.generate(["the lazy", ids], greedy(6))]
    c = srv.client()
    got = c.completions.create(model=NAME, prompt=["the lazy", "hello world"], max_tokens=6, temperature=0)
    assert [ch.text for ch in sorted(got.choices, key=lambda ch: ch.index)] == want
    by_ids = c.completions.create(model=NAME, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [ch.text for ch in by_ids.choices] == [want[1], want[1]]
    echo = c.completions.create(model=NAME, prompt=ids, max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == "hello world" + want[1]


def test_echo_with_logprobs_scores_the_prompt_like_the_model(srv, reference, model_tok):
    model, tok = model_tok
    prompts = ["the lazy", "hello world, stop"]
    want = reference.generate(prompts, greedy(6))
    c = srv.client()
    got = c.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0, echo=True,
                               logprobs=2)
    for choice, w in zip(sorted(got.choices, key=lambda ch: ch.index), want, strict=True):
        ids = w.prompt_token_ids + w.token_ids
        lp = choice.logprobs
        assert choice.text == prompts[choice.index] + w.text
        assert lp.tokens == [tok.decode([i]) for i in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        logp = model(torch.tensor([ids]))[0, :, :tok.vocab_size].float().log_softmax(-1)
        for pos in range(1, len(ids)):  # the prompt's tokens, then the completion's
            assert lp.token_logprobs[pos] == pytest.approx(logp[pos - 1, ids[pos]].item(), abs=1e-4)
            top = logp[pos - 1].topk(2)  # keyed by text, as OpenAI's: tokens may share one
            want_top = {tok.decode([i]): v for i, v in zip(*top[::-1], strict=True)}
            assert lp.top_logprobs[pos].keys() == want_top.keys()
            assert list(lp.top_logprobs[pos].values()) == pytest.approx(
                [v.item() for v in want_top.values()], abs=1e-4)
        assert lp.text_offset[len(w.prompt_token_ids)] == len(prompts[choice.index])
    chunks = list(c.completions.create(model=NAME, prompt=prompts[1], max_tokens=6, temperature=0,
                                       echo=True, logprobs=2, stream=True))
    streamed = [lp for ch in chunks if (lp := ch.choices[0].logprobs) is not None]
    whole = sorted(got.choices, key=lambda ch: ch.index)[1].logprobs
    assert [t for lp in streamed for t in lp.tokens] == whole.tokens
    values = [v for lp in streamed for v in lp.token_logprobs]
    assert values[0] is None and values[1:] == pytest.approx(whole.token_logprobs[1:], abs=1e-4)
    assert len(streamed[0].tokens) > len(want[1].prompt_token_ids)  # the prompt comes first


def test_chat_and_streaming_equal_the_engine(srv, reference):
    tok = srv.tokenizer
    want = reference.generate(chat_ids(tok, "hi there"), greedy(16))[0]
    messages = [{"role": "user", "content": "hi there"}]
    c = srv.client()
    got = c.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=16,
                                    temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=16,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    assert all(ch.id == chunks[0].id and ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model=NAME, prompt="the quick", max_tokens=12, temperature=0, stream=True))
    assert text == reference.generate("the quick", greedy(12))[0].text


def test_stream_ends_with_done_and_usage_chunk(srv):
    body = {"model": NAME, "prompt": "hello", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}, "n": 2}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10
    assert all(ch["usage"] is None for ch in chunks[:-1])
    assert {ch["choices"][0]["index"] for ch in chunks[:-1]} == {0, 1}


def test_n_choices_and_seeds_reproduce_among_concurrent_requests(srv):
    c = srv.client()
    args = dict(model=NAME, prompt="the quick", max_tokens=12, temperature=1.0)
    alone = c.completions.create(**args, seed=7, n=3)
    texts = [ch.text for ch in alone.choices]
    assert len(set(texts)) == 3  # choice j samples with seed + j

    async def crowd():
        ac = srv.aclient()
        calls = [ac.completions.create(**args, seed=7 if i == 5 else 100 + i, n=3 if i == 5 else 1)
                 for i in range(16)]
        return await asyncio.gather(*calls)

    outs = asyncio.run(crowd())
    assert [ch.text for ch in outs[5].choices] == texts
    assert [ch.text for ch in c.completions.create(**args, seed=7, n=3).choices] == texts


def test_stop_strings_cut_the_text(srv, reference):
    full = reference.generate("the quick", greedy(20))[0].text
    stop = full[5:8]
    want_text = full[:full.index(stop)]
    c = srv.client()
    got = c.completions.create(model=NAME, prompt="the quick", max_tokens=20, temperature=0,
                               stop=[stop, "\u2603never"])
    assert got.choices[0].text == want_text and got.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=NAME, prompt="the quick", max_tokens=20, temperature=0, stop=stop, stream=True))
    assert streamed == want_text


def test_logprobs_and_top_logprobs(srv):
    c = srv.client()
    got = c.completions.create(model=NAME, prompt="hello", max_tokens=6, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and len(top) <= 3
        assert max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy: the top token
    chat = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello"}],
                                     max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
               for t in content)


def test_logit_bias_and_vllm_extras(srv):
    c = srv.client()
    token = srv.tokenizer.encode("fox")[0]
    got = c.completions.create(model=NAME, prompt="hello", max_tokens=4, temperature=0,
                               logit_bias={str(token): 100})
    assert got.choices[0].text == srv.tokenizer.decode([token] * 4)
    extras = c.completions.create(model=NAME, prompt="hello", max_tokens=6, temperature=0.8, seed=1,
                                  extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2,
                                              "ignore_eos": True, "min_tokens": 6})
    assert extras.usage.completion_tokens == 6


# ----------------------------------------------------------------------------- load and faults

def test_64_concurrent_streams_all_complete_correctly(srv, reference):
    prompts = [f"the quick {i}" for i in range(64)]
    lengths = [4 + i % 13 for i in range(64)]
    want = [reference.generate(p, greedy(n))[0].text for p, n in zip(prompts, lengths, strict=True)]

    async def one(ac, prompt, n):
        stream = await ac.completions.create(model=NAME, prompt=prompt, max_tokens=n,
                                             temperature=0, stream=True)
        return "".join([ch.choices[0].text async for ch in stream])

    async def crowd():
        ac = srv.aclient()
        return await asyncio.gather(*(one(ac, p, n) for p, n in zip(prompts, lengths, strict=True)))

    assert asyncio.run(crowd()) == want
    assert_all_free(srv)


@pytest.fixture(params=["engine process", "engine thread"])
def slow_srv(request, model_tok, checkpoint):
    """A server whose engine steps take at least 10 ms each, so no request can reach max_tokens
    before its client leaves (the tiny model alone can decode 240 tokens inside 0.3 s)."""
    load = functools.partial(slow_llm, str(checkpoint), 0.01, block_size=8, max_num_seqs=16)
    if request.param == "engine thread":
        llm = load()
        load = lambda: llm  # noqa: E731
    with serving(load, model_tok[1], engine_process=request.param == "engine process") as s:
        yield s


def test_outputs_sent_from_the_engine_process_assemble_to_the_engine_outputs(model_tok):
    """What crosses the pipe (WireOutput: new tokens, text and logprobs only) adds up, on the
    server's side, to exactly the RequestOutputs the engine made: stop strings, sampling,
    logprobs, outputs finished at the first token."""
    from lmstack.serve.loop import Assembler, WireOutput

    model, tok = model_tok
    llm = LLM(model, tok, block_size=8)
    cases = [("the quick brown fox", SamplingParams(max_tokens=12, temperature=0, logprobs=2)),
             ("hello world", SamplingParams(max_tokens=20, temperature=0.9, seed=1, stop=["e", "o"])),
             ("stop here", SamplingParams(max_tokens=1, temperature=0)),
             ("the lazy dog", SamplingParams(max_tokens=16, temperature=0.7, seed=2, logprobs=0))]
    assembler, seen, ends, ids = Assembler(), 0, {}, []
    for text, params in cases:
        prompt = tok.encode(text)
        ids.append(llm.add_request(prompt, params))
        assembler.begin(ids[-1], prompt)
    while llm.has_unfinished():
        for out in llm.step():
            sent = pickle.loads(pickle.dumps(WireOutput.of(out)))
            assert assembler.output(sent) == out
            seen += 1
            if out.finished:
                ends[out.request_id] = out.stop_reason
    assert seen > len(cases)
    assert ends[ids[1]] in ("e", "o")  # the stop-string case did stop on one


def test_dropped_streams_leave_no_sequence_or_block(slow_srv):
    srv = slow_srv

    def drop():
        body = {"model": NAME, "prompt": "the lazy dog", "max_tokens": 200, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    return  # one chunk read, then the connection closes

    def give_up():  # a non-streaming request whose client stops waiting
        body = {"model": NAME, "prompt": "the lazy dog", "max_tokens": 240, "ignore_eos": True}
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/completions", json=body, timeout=0.3,
                       headers={"Authorization": f"Bearer {KEY}"})

    aborted = srv.metric("lmstack:request_success_total", 'finished_reason="abort"')
    finished = srv.metric("lmstack:request_success_total", 'finished_reason="length"')
    threads = [threading.Thread(target=drop) for _ in range(6)] + [threading.Thread(target=give_up)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert_all_free(srv)
    assert wait_until(lambda: srv.metric("lmstack:num_requests_running") == 0)
    assert srv.metric("lmstack:kv_cache_usage_perc") == 0
    # the six streams are admitted (each read a chunk) and aborted; the client that gives up
    # after 0.3 s can leave before its request is admitted on a loaded machine (then it never
    # runs), but never lets it run to the end
    dropped = srv.metric("lmstack:request_success_total", 'finished_reason="abort"') - aborted
    assert dropped in (6, 7), dropped
    assert srv.metric("lmstack:request_success_total", 'finished_reason="length"') == finished
    assert httpx.get(srv.url + "/health").status_code == 200


def test_flood_past_the_queue_gets_429_and_stays_healthy(model_tok):
    model, tok = model_tok
    with running_server(LLM(model, tok, block_size=8, max_num_seqs=2), max_waiting=2) as s:
        async def flood():
            async with httpx.AsyncClient(timeout=60) as http:
                body = {"model": NAME, "prompt": "hello", "max_tokens": 60, "ignore_eos": True}
                calls = [http.post(s.url + "/v1/completions", json=body,
                                   headers={"Authorization": f"Bearer {KEY}"}) for _ in range(12)]
                return await asyncio.gather(*calls)

        answers = asyncio.run(flood())
        codes = sorted(r.status_code for r in answers)
        assert codes.count(200) >= 4 and codes.count(429) >= 1 and set(codes) == {200, 429}
        busy = next(r for r in answers if r.status_code == 429)
        assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
        assert httpx.get(s.url + "/health").status_code == 200
        assert s.client().completions.create(model=NAME, prompt="hi", max_tokens=2).choices
        assert_all_free(s)


def test_health_is_503_while_loading_and_after_the_engine_loop_dies(model_tok):
    model, tok = model_tok
    llm, loaded = LLM(model, tok, block_size=8), threading.Event()
    port = free_port()
    app = build_app(lambda: loaded.wait(30) and llm,
                    ServeConfig(port=port, api_key=KEY, engine_process=False), NAME)
    srv = server(app, log_level="critical")
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _status(url + "/health") == 503)
        assert httpx.get(url + "/health").json()["status"] == "loading"
        r = httpx.post(url + CMPL, json={"prompt": "a"}, headers=AUTH)
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        loaded.set()
        wait_healthy(url)

        def broken_step():
            raise RuntimeError("a broken step")
        llm.step = broken_step
        r = httpx.post(url + CMPL, json={"prompt": "a", "max_tokens": 4}, headers=AUTH, timeout=30)
        assert r.status_code == 503 and "broken step" in r.json()["error"]["message"]
        assert httpx.get(url + "/health").status_code == 503
    finally:
        srv.should_exit = True
        thread.join(timeout=30)


def test_a_killed_engine_process_turns_health_503(model_tok, checkpoint):
    with serving(functools.partial(LLM, str(checkpoint), block_size=8), model_tok[1]) as s:
        assert s.client().completions.create(model=NAME, prompt="hi", max_tokens=2).choices
        os.kill(s.engine.pid, signal.SIGKILL)
        assert wait_until(lambda: _status(s.url + "/health") == 503)
        r = httpx.post(s.url + CMPL, json={"prompt": "a", "max_tokens": 4}, headers=AUTH, timeout=30)
        assert r.status_code == 503 and "engine process exited" in r.json()["error"]["message"]


def test_a_loader_that_cannot_reach_the_engine_process_fails_clearly(caplog):
    app = build_app(lambda: None, ServeConfig(port=free_port()), NAME)
    thread = threading.Thread(target=server(app, log_level="critical").run, daemon=True)
    thread.start()
    thread.join(timeout=60)  # the server stops by itself when loading fails
    assert not thread.is_alive() and app.state.lmstack.status == "failed"
    assert "functools.partial(LLM, path, ...)" in caplog.text and "engine_process=False" in caplog.text


def test_a_model_that_fails_to_load_in_the_engine_process_stops_the_server(tmp_path, caplog):
    app = build_app(functools.partial(LLM, str(tmp_path / "missing")), ServeConfig(port=free_port()), NAME)
    thread = threading.Thread(target=server(app, log_level="critical").run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive() and app.state.lmstack.status == "failed"
    assert "loading the model failed in the engine process" in caplog.text and "missing" in caplog.text


def _status(url: str) -> int | None:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url).status_code
    return None


# ----------------------------------------------------------------------------- bad input

AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {**AUTH, "content-type": "application/json"}
CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]

BAD = {
    "invalid json": ("POST", CMPL, b'{"prompt": "a",', JSON, 400),
    "not utf-8": ("POST", CMPL, b'{"prompt": "\xff\xfe"}', JSON, 400),
    "wrong type": ("POST", CMPL, {"prompt": "a", "max_tokens": "many"}, AUTH, 400),
    "unknown model": ("POST", CMPL, {"model": "gpt-9", "prompt": "a"}, AUTH, 404),
    "empty messages": ("POST", CHAT, {"model": NAME, "messages": []}, AUTH, 400),
    "prompt over the context": ("POST", CMPL, {"prompt": "the quick brown fox " * 80}, AUTH, 400),
    "prompt + max_tokens over the context": ("POST", CMPL, {"prompt": "hello", "max_tokens": 254},
                                             AUTH, 400),
    "negative max_tokens": ("POST", CMPL, {"prompt": "a", "max_tokens": -1}, AUTH, 400),
    "huge max_tokens": ("POST", CMPL, {"prompt": "a", "max_tokens": 10**9}, AUTH, 400),
    "temperature out of range": ("POST", CHAT, {"messages": MSG, "temperature": 7}, AUTH, 400),
    "missing key": ("POST", CHAT, {"messages": MSG}, {}, 401),
    "wrong key": ("POST", CHAT, {"messages": MSG}, {"Authorization": "Bearer nope"}, 401),
    "oversized body": ("POST", CMPL, {"prompt": "a" * (2 << 20)}, AUTH, 413),
    "n too large": ("POST", CMPL, {"prompt": "a", "n": 99}, AUTH, 400),
    "unsupported schema": ("POST", CHAT, {"messages": MSG, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "null"}}}}},
        AUTH, 400),
    "stream_options without stream": ("POST", CMPL, {"prompt": "a", "stream_options":
                                                     {"include_usage": True}}, AUTH, 400),
    "suffix": ("POST", CMPL, {"prompt": "a", "suffix": "b"}, AUTH, 400),
    "unknown route": ("GET", "/v1/nothing", None, AUTH, 404),
    "wrong method": ("GET", CMPL, None, AUTH, 405),
    "token id outside the vocabulary": ("POST", CMPL, {"prompt": [1, 10**6]}, AUTH, 400),
    "stop token id outside the vocabulary": ("POST", CMPL, {"prompt": "a", "stop_token_ids": [10**6],
                                                            "min_tokens": 1}, AUTH, 400),
    "top_k past int64 (found by the fuzzer)": ("POST", CMPL, {"prompt": "a", "top_k": 10**30},
                                               AUTH, 400),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_input_gets_the_envelope_and_the_server_stays_healthy(srv, case):
    method, path, body, headers, status = case
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.request(method, srv.url + path, headers=headers, timeout=30, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert httpx.get(srv.url + "/health").status_code == 200


def test_context_error_states_both_numbers(srv):
    r = httpx.post(srv.url + CMPL, json={"prompt": "hello", "max_tokens": 254}, headers=AUTH)
    n = len(srv.tokenizer.encode("hello"))
    message = r.json()["error"]["message"]
    assert f"{n} tokens" in message and "254" in message and "256" in message


def test_unsupported_schema_names_the_keyword(srv):
    body = {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "dependentSchemas": {}}}}}
    r = httpx.post(srv.url + CHAT, json=body, headers=AUTH)
    assert r.status_code == 400 and "dependentSchemas" in r.json()["error"]["message"]


def test_openai_client_sees_client_errors_as_4xx(srv):
    with pytest.raises(openai.BadRequestError):
        srv.client().chat.completions.create(model=NAME, messages=MSG, n=50)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        srv.client().completions.create(model="other", prompt="a")


@pytest.mark.slow
def test_fuzzed_requests_get_no_5xx_and_always_the_envelope(srv):
    """schemathesis generates bodies from the app's OpenAPI schema (seeded, bounded)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
    failures = []
    for op in schema.get_all_operations():
        operation = op.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            r = case.call(base_url=srv.url, headers=AUTH, timeout=30)
            ok = r.status_code < 500
            if r.status_code >= 400:
                try:
                    error = r.json()["error"]
                except (ValueError, KeyError, TypeError):
                    error = None
                ok = ok and isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
            if not ok:
                failures.append((case.path, r.status_code, r.text[:200], case.body))

        check()
    assert not failures, failures[:5]
    assert httpx.get(srv.url + "/health").status_code == 200


# ----------------------------------------------------------------------------- the command line

SIGTERMS = {
    "in-flight requests finish": dict(drain_s=20, seqs=64, max_tokens=40),
    "the rest are aborted at the timeout": dict(drain_s=1, seqs=1, max_tokens=240),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", SIGTERMS.values(), ids=SIGTERMS.keys())
def test_sigterm_during_load_drains_and_exits_0(checkpoint, case):
    port = free_port()
    cmd = [sys.executable, "-m", "lmstack", "serve", str(checkpoint), "--port", str(port),
           "--api-key", KEY, "--block-size", "8", "--log-level", "warning",
           "--drain-timeout-s", str(case["drain_s"]), "--max-num-seqs", str(case["seqs"])]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=120)
        results: list = []
        started = [threading.Event() for _ in range(4)]

        def stream(i):
            body = {"model": checkpoint.name, "prompt": "hello", "max_tokens": case["max_tokens"],
                    "stream": True, "ignore_eos": True}
            events = []
            with contextlib.suppress(httpx.HTTPError):  # an aborted stream is cut short
                with httpx.stream("POST", url + CMPL, json=body, headers=AUTH, timeout=60) as r:
                    started[i].set()  # the headers came: the server holds the request
                    events += [line for line in r.iter_lines() if line.startswith("data: ")]
            results.append(events)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        assert all(e.wait(timeout=60) for e in started)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        assert proc.wait(timeout=60) == 0
        done = [bool(events) and events[-1] == "data: [DONE]" for events in results]
        assert len(results) == 4
        if case["drain_s"] > 1:
            assert all(done)
            finishes = [json.loads(e[6:])["choices"][0]["finish_reason"]
                        for ev in results for e in ev[:-1]]
            assert finishes.count("length") == 4
        else:  # one seat, 4 x 240 tokens: the queued ones cannot finish within a second
            assert not all(done)
    finally:
        if proc.poll() is None:
            proc.kill()

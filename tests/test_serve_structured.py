"""Structured outputs and the engine features the server needs: grammar masks over the model's
whole logit width, JSON-schema outputs that parse and validate over many seeds on a random
model, forced tool calls, logit_bias, min_tokens, and padding ids that are never sampled."""

from __future__ import annotations

import functools
import json

import jsonschema
import pytest
from test_serve import (
    KEY,
    NAME,
    assert_all_free,
    running_server,
    saved,
    serving,
    tiny_model_and_tokenizer,
)

from lmstack.infer import LLM, SamplingParams
from lmstack.infer.structured import GrammarCompiler

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "kind": {"enum": ["a", "bb", None]},
    },
    "required": ["name", "age", "ok", "tags", "kind"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "stop_timer", "parameters": {
        "type": "object", "properties": {"now": {"type": "boolean"}}, "required": ["now"],
        "additionalProperties": False}}},
]
MSG = [{"role": "user", "content": "give me json"}]


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model_and_tokenizer()


@pytest.fixture(scope="module", params=["engine process", "engine thread"])
def srv(request, model_tok, tmp_path_factory):
    """Both layouts: the engine process builds constraints from the grammar itself; the thread
    takes the ones the server built."""
    model, tok = model_tok
    if request.param == "engine thread":
        with running_server(LLM(model, tok, block_size=8, max_num_seqs=16), max_n=8) as s:
            yield s
        return
    path = saved(model, tok, tmp_path_factory.mktemp("ckpt"))
    with serving(functools.partial(LLM, str(path), block_size=8, max_num_seqs=16), tok, max_n=8) as s:
        yield s


# ----------------------------------------------------------------------------- engine level

def test_masks_span_the_whole_logit_width(model_tok):
    model, tok = model_tok
    V = model.config.vocab_size
    assert V > tok.vocab_size  # the embedding has padding rows past the tokenizer
    compiler = GrammarCompiler(tok, V)
    c = compiler.constraint(compiler.json_schema(SCHEMA))
    mask = c.allowed(V)
    assert mask.shape == (V,) and mask.any() and not mask[tok.vocab_size:].any()
    assert tok.decode(mask.nonzero().flatten().tolist()).startswith("{")  # only '{' can open it


def test_grammar_cache_compiles_each_schema_once(model_tok):
    model, tok = model_tok
    compiler = GrammarCompiler(tok, model.config.vocab_size)
    grammar = compiler.json_schema(SCHEMA)
    for _ in range(3):
        compiler.constraint(grammar)
    assert (compiler.misses, compiler.hits) == (1, 2)
    with pytest.raises(ValueError, match="not"):
        compiler.constraint(compiler.json_schema({"not": {"type": "string"}}))


def test_engine_constraint_output_validates_and_padding_is_never_sampled(model_tok):
    model, tok = model_tok
    llm = LLM(model, tok, block_size=8)
    compiler = GrammarCompiler(tok, model.config.vocab_size)
    grammar = compiler.json_schema(SCHEMA)
    ids = []
    for seed in range(6):
        llm.add_request("hello", SamplingParams(max_tokens=150, seed=seed), f"r{seed}",
                        compiler.constraint(grammar))
    finals = {}
    while llm.has_unfinished():
        finals.update((o.request_id, o) for o in llm.step() if o.finished)
    for out in finals.values():
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), SCHEMA)
        ids += out.token_ids
    free = LLM(model, tok, block_size=8).generate(["a", "b", "c"], SamplingParams(max_tokens=60, seed=1))
    assert max(ids + [t for o in free for t in o.token_ids]) < tok.vocab_size


def test_logit_bias_and_min_tokens_in_the_engine(model_tok):
    model, tok = model_tok
    eos = tok.eos_id
    llm = LLM(model, tok, block_size=8)
    forced = llm.generate("hello", SamplingParams(max_tokens=5, temperature=0, logit_bias={eos: 100},
                                                  min_tokens=3))[0]
    assert eos not in forced.token_ids[:3] and forced.token_ids[3] == eos
    assert forced.finish_reason == "stop" and len(forced.token_ids) == 4
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"x": 1})
    with pytest.raises(ValueError, match="vocabulary"):
        llm.add_request("hello", SamplingParams(logit_bias={10**6: 1.0}))


# ----------------------------------------------------------------------------- over HTTP

def test_json_schema_outputs_parse_and_validate_over_many_seeds(srv):
    c = srv.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    outs = []
    for seed in range(4):
        r = c.chat.completions.create(model=NAME, messages=MSG, max_tokens=150, seed=seed, n=6,
                                      temperature=1.0, response_format=fmt)
        outs += r.choices
    assert len(outs) == 24
    for choice in outs:
        assert choice.finish_reason == "stop"
        value = json.loads(choice.message.content)  # strict: raw control characters are refused
        jsonschema.validate(value, SCHEMA)
    assert len({ch.message.content for ch in outs}) > 1


def test_json_object_and_streamed_json(srv):
    c = srv.client()
    r = c.chat.completions.create(model=NAME, messages=MSG, max_tokens=200, seed=3,
                                  response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].finish_reason == "length"
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    chunks = list(c.chat.completions.create(model=NAME, messages=MSG, max_tokens=150, seed=5,
                                            response_format=fmt, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_structured_output_cut_by_max_tokens_ends_with_length(srv):
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    r = srv.client().chat.completions.create(model=NAME, messages=MSG, max_tokens=3, seed=0,
                                             response_format=fmt)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_named_tool_call_arguments_validate(srv):
    c = srv.client()
    params = TOOLS[0]["function"]["parameters"]
    for seed in range(3):
        r = c.chat.completions.create(
            model=NAME, messages=MSG, max_tokens=120, seed=seed, tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), params)


def test_required_tool_choice_picks_one_of_the_tools(srv):
    c = srv.client()
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    r = c.chat.completions.create(model=NAME, messages=MSG, max_tokens=120, seed=1, n=4,
                                  tools=TOOLS, tool_choice="required")
    for choice in r.choices:
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        assert choice.finish_reason == "tool_calls"


def streamed_call(c, **kw):
    """(the tool-call deltas in order, the last chunk's finish_reason) of one streamed choice."""
    chunks = list(c.chat.completions.create(model=NAME, messages=MSG, max_tokens=120,
                                            tools=TOOLS, stream=True, **kw))
    assert all(len(ch.choices) == 1 for ch in chunks)
    deltas = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert all(not ch.choices[0].delta.content for ch in chunks)
    return deltas, chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}},
                                    "required"])
def test_streamed_tool_call_arrives_in_openai_increments(srv, choice):
    c = srv.client()
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    names = set()
    for seed in range(3):
        whole = c.chat.completions.create(model=NAME, messages=MSG, max_tokens=120, seed=seed,
                                          tools=TOOLS, tool_choice=choice)
        (call,) = whole.choices[0].message.tool_calls
        deltas, finish = streamed_call(c, seed=seed, tool_choice=choice)
        head, rest = deltas[0], deltas[1:]
        assert head.index == 0 and head.type == "function" and head.id.startswith("call_")
        assert head.function.name == call.function.name and head.function.arguments == ""
        assert len(rest) > 1  # the arguments come in pieces, as they are generated
        assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
        arguments = "".join(d.function.arguments for d in rest)
        assert arguments == call.function.arguments and finish == "tool_calls"
        jsonschema.validate(json.loads(arguments), schemas[head.function.name])
        names.add(head.function.name)
    assert names <= set(schemas)


def brace_bias(tok, value: float) -> dict[str, float]:
    """logit_bias on every token whose text starts with "{" (what opens a call)."""
    return {str(i): value for i in range(tok.vocab_size) if tok.decode([i]).startswith("{")}


def assert_call_or_text(choice, schemas):
    calls = choice.message.tool_calls
    if choice.finish_reason == "tool_calls":
        (call,) = calls
        assert choice.message.content is None
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        return "call"
    assert not calls and not choice.message.content.startswith("{")
    return "text"


@pytest.mark.parametrize("auto", [{"tool_choice": "auto"}, {}])  # auto is the default with tools
def test_auto_tool_choice_is_a_valid_call_or_text(srv, model_tok, auto):
    c = srv.client()
    _, tok = model_tok
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    kinds = []
    for seed in range(3):
        r = c.chat.completions.create(model=NAME, messages=MSG, max_tokens=60, seed=seed, n=4,
                                      tools=TOOLS, **auto)
        kinds += [assert_call_or_text(ch, schemas) for ch in r.choices if ch.finish_reason != "length"]
    called = c.chat.completions.create(model=NAME, messages=MSG, max_tokens=120, seed=0, n=3,
                                       tools=TOOLS, logit_bias=brace_bias(tok, 100), **auto)
    assert {assert_call_or_text(ch, schemas) for ch in called.choices} == {"call"}
    answered = c.chat.completions.create(model=NAME, messages=MSG, max_tokens=20, seed=0,
                                         tools=TOOLS, logit_bias=brace_bias(tok, 100),
                                         tool_choice="none")
    assert answered.choices[0].message.content.startswith("{")  # none: text, never parsed
    assert not answered.choices[0].message.tool_calls
    assert answered.choices[0].finish_reason in ("stop", "length")
    assert kinds  # the unbiased runs were checked too


def test_auto_tool_choice_streams_a_call_or_content(srv, model_tok):
    c = srv.client()
    _, tok = model_tok
    for bias in (100, -100):
        args = dict(model=NAME, messages=MSG, max_tokens=40, seed=2, tools=TOOLS,
                    tool_choice="auto", logit_bias=brace_bias(tok, bias))
        whole = c.chat.completions.create(**args).choices[0]
        chunks = list(c.chat.completions.create(**args, stream=True))
        deltas = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
        content = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        assert chunks[-1].choices[0].finish_reason == whole.finish_reason
        if bias > 0:
            (call,) = whole.message.tool_calls
            assert deltas[0].function.name == call.function.name and not content
            assert "".join(d.function.arguments for d in deltas) == call.function.arguments
        else:
            assert content == whole.message.content and not deltas
            assert not content.startswith("{")


def test_unknown_tool_is_a_400(srv):
    import httpx

    body = {"messages": MSG, "tools": TOOLS, "tool_choice": {"type": "function",
                                                             "function": {"name": "nope"}}}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "tool_choice"


def test_structured_requests_leave_no_block_behind(srv):
    assert_all_free(srv)

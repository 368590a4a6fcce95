"""Structured outputs and the engine features the server needs: grammar masks over the model's
whole logit width, JSON-schema outputs that parse and validate over many seeds on a random
model, forced tool calls, logit_bias, min_tokens, and padding ids that are never sampled."""

from __future__ import annotations

import json

import jsonschema
import pytest
from test_serve import KEY, NAME, assert_all_free, running_server, tiny_model_and_tokenizer

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


@pytest.fixture(scope="module")
def srv(model_tok):
    model, tok = model_tok
    with running_server(LLM(model, tok, block_size=8, max_num_seqs=16), max_n=8) as s:
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
    chunks = list(c.chat.completions.create(model=NAME, messages=MSG, max_tokens=120, seed=1,
                                            tools=TOOLS, tool_choice="required", stream=True))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name in schemas
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_unknown_tool_is_a_400(srv):
    import httpx

    body = {"messages": MSG, "tools": TOOLS, "tool_choice": {"type": "function",
                                                             "function": {"name": "nope"}}}
    r = httpx.post(srv.url + "/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "nope" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "tool_choice"


def test_structured_requests_leave_no_block_behind(srv):
    assert_all_free(srv.llm)

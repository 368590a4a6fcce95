"""OpenAI request bodies -> a Job: the prompts in token ids, one SamplingParams per choice, and
the grammar that constrains them, checked against the server's limits. Every refusal is an
APIError (400 unless said otherwise) naming the field to change.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from lmstack.infer import SamplingParams, TokenLogprob
from lmstack.serve.config import ServeConfig
from lmstack.serve.errors import APIError
from lmstack.serve.protocol import ChatMessage, ChatRequest, CompletionRequest, Sampling


@dataclass
class ToolMode:
    """How a chat output is read as a tool call. A named tool_choice: the output is `name`'s
    arguments. Otherwise the output is a call in structured.tool_call_head's form,
    {"name":N,"arguments":A} for N in `names` ("required"), or (auto) either that or free text
    that does not start with "{"."""

    name: str | None
    names: list[str] = field(default_factory=list)
    auto: bool = False


@dataclass
class Job:
    """One HTTP request's work: len(prompts) * n engine requests, choice k = prompt k // n."""

    kind: str  # "text_completion" or "chat.completion"
    model: str
    prompts: list[list[int]]
    params: list[SamplingParams]  # one per choice
    n: int
    stream: bool = False
    include_usage: bool = False
    grammar: str | None = None
    grammar_param: str | None = None
    tool: ToolMode | None = None
    echo: list[str] | None = None  # completions: the prompt text to put before each choice's
    logprobs: int | None = None  # completions: top-n per token; chat: top_logprobs
    prompt_logprobs: list[list[TokenLogprob | None]] | None = None  # echo with logprobs, per prompt
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def request_id(self, choice: int) -> str:
        return f"{self.id}-{choice}"

    @property
    def num_choices(self) -> int:
        return len(self.params)


@dataclass
class Limits:
    context: int  # the engine's max_model_len
    config: ServeConfig

    @property
    def max_tokens(self) -> int:
        return self.config.max_tokens or self.context

    @property
    def max_prompt(self) -> int:
        return self.config.max_prompt_tokens or self.context - 1


def completion_job(req: CompletionRequest, tokenizer, limits: Limits, model: str) -> Job:
    if req.suffix is not None:
        raise APIError(400, "suffix is not supported (no fill-in-the-middle); leave it out", "suffix")
    prompts = _completion_prompts(req.prompt, tokenizer)
    params = [p for ids in prompts for p in _choices(req, ids, req.max_tokens, req.logprobs, limits)]
    echo = [tokenizer.decode(ids) for ids in prompts] if req.echo else None
    job = Job("text_completion", model, prompts, params, req.n, req.stream, _usage(req),
              echo=echo, logprobs=req.logprobs)
    return _with_format(job, req)


def chat_job(req: ChatRequest, tokenizer, limits: Limits, model: str) -> Job:
    ids = render_chat(req.messages, tokenizer, req.tools)
    max_tokens = req.max_completion_tokens or req.max_tokens
    top = (req.top_logprobs or 0) if req.logprobs else None
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    params = _choices(req, ids, max_tokens, top, limits)
    job = Job("chat.completion", model, [ids], params, req.n, req.stream, _usage(req), logprobs=top)
    return _with_tools(_with_format(job, req), req)


def _usage(req: Sampling) -> bool:
    return req.stream_options is not None and req.stream_options.include_usage


# ----------------------------------------------------------------------------- prompts

def _completion_prompts(prompt, tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty; give a string, token ids or a list of them", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    out = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    if not all(out):
        raise APIError(400, "a prompt is empty; give at least one token each", "prompt")
    return out


def render_chat(messages: list[ChatMessage], tokenizer, tools=None) -> list[int]:
    """The prompt of a conversation: the chat template's text, assistant turn opened, in ids."""
    if not messages:
        raise APIError(400, "messages is empty; give at least one message", "messages")
    chat = [_message_dict(m) for m in messages]
    extra = {"tools": [t.model_dump() for t in tools]} if tools else {}
    try:
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, **extra)
    except ValueError as e:
        raise APIError(400, f"cannot render the messages: {e}", "messages") from None
    return tokenizer.encode(text)


def _message_dict(m: ChatMessage) -> dict:
    content = m.content
    if isinstance(content, list):
        content = "".join(part.text for part in content)
    out = {"role": m.role, "content": content or "", "name": m.name,
           "tool_call_id": m.tool_call_id}
    if m.tool_calls:
        out["tool_calls"] = [t.model_dump() for t in m.tool_calls]
    return out


# ----------------------------------------------------------------------------- sampling

def _choices(req: Sampling, prompt: list[int], max_tokens: int | None, logprobs: int | None,
             limits: Limits) -> list[SamplingParams]:
    """One SamplingParams per choice of one prompt; choice j seeds seed + j."""
    if req.n > limits.config.max_n:
        raise APIError(400, f"n={req.n} is over the server's limit of {limits.config.max_n} "
                            "(lmstack serve --max-n)", "n")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options needs stream: true", "stream_options")
    where = "prompt" if isinstance(req, CompletionRequest) else "messages"
    max_tokens = _max_tokens(len(prompt), max_tokens, limits, where)
    seeds = [None if req.seed is None else req.seed + j for j in range(req.n)]
    return [_params(req, max_tokens, logprobs, s) for s in seeds]


def _max_tokens(prompt_len: int, asked: int | None, limits: Limits, where: str) -> int:
    if prompt_len > limits.max_prompt:
        raise APIError(400, f"the prompt has {prompt_len} tokens, over the limit of "
                            f"{limits.max_prompt}; shorten it", where, "context_length_exceeded")
    if asked is None:
        return min(limits.max_tokens, limits.context - prompt_len)
    if asked > limits.max_tokens:
        raise APIError(400, f"max_tokens={asked} is over the server's limit of {limits.max_tokens}",
                       "max_tokens")
    if prompt_len + asked > limits.context:
        raise APIError(400, f"the prompt has {prompt_len} tokens and max_tokens is {asked}: "
                            f"{prompt_len + asked} in all, over the context of {limits.context} "
                            "tokens; shorten the prompt or lower max_tokens", "max_tokens",
                       "context_length_exceeded")
    return asked


def _params(req: Sampling, max_tokens: int, logprobs: int | None, seed: int | None) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_k=max(req.top_k, 0), top_p=1.0 if req.top_p is None else req.top_p,
            min_p=req.min_p, repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            stop=stop, stop_token_ids=req.stop_token_ids or [], seed=seed, logprobs=logprobs,
            ignore_eos=req.ignore_eos, min_tokens=req.min_tokens, logit_bias=req.logit_bias)
    except ValueError as e:
        name = str(e).split("=", 1)[0].removeprefix("SamplingParams.").split(" ")[0]
        raise APIError(400, str(e).replace("SamplingParams.", ""), name) from None


# ----------------------------------------------------------------------------- structured outputs

def _with_format(job: Job, req: Sampling) -> Job:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return job
    from lmstack.infer.structured import GrammarCompiler

    schema = None
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise APIError(400, "response_format json_schema needs its json_schema object",
                           "response_format.json_schema")
        schema = fmt.json_schema.schema_ or {}
    job.grammar = _grammar(lambda: GrammarCompiler.json_schema(schema), "response_format")
    job.grammar_param = "response_format"
    return job


def _with_tools(job: Job, req: ChatRequest) -> Job:
    """tool_choice none: tools only reach the chat template; auto (the default with tools): a
    call or text; required: a call of one of the tools; named: that tool's arguments."""
    choice = req.tool_choice
    if not req.tools:
        if choice == "required" or (choice is not None and not isinstance(choice, str)):
            raise APIError(400, "tool_choice names a tool but tools is empty", "tools")
        return job
    if choice == "none" or (choice in (None, "auto") and job.grammar is not None):
        return job  # response_format shapes the answer; the model is not offered a call
    if job.grammar is not None:
        raise APIError(400, "give response_format or a required or named tool_choice, not both",
                       "tool_choice")
    from lmstack.infer.structured import GrammarCompiler

    tools = {t.function.name: t.function.parameters or {"type": "object"} for t in req.tools}
    if isinstance(choice, str) or choice is None:
        auto = choice != "required"
        job.tool = ToolMode(None, list(tools), auto)
        job.grammar = _grammar(lambda: GrammarCompiler.tool_calls(tools, text=auto), "tools")
    else:
        name = choice.function.name
        if name not in tools:
            raise APIError(400, f"tool_choice names {name!r}, not one of the tools {sorted(tools)}",
                           "tool_choice")
        job.tool = ToolMode(name)
        job.grammar = _grammar(lambda: GrammarCompiler.json_schema(tools[name]), "tools")
    job.grammar_param = "tools"
    return job


def _grammar(build: Callable[[], str], param: str) -> str:
    try:
        return build()
    except (ValueError, TypeError) as e:
        raise APIError(400, f"the schema is not valid JSON Schema: {e}", param) from None


def call_so_far(tool: ToolMode, text: str) -> tuple[str, str] | None:
    """(name, the arguments' text so far) of a constrained output once it is a call whose name
    is complete; None before that, and for auto's text answers. In the {"name","arguments"}
    form the text so far ends with the wrapper's closing brace once the call is complete."""
    from lmstack.infer.structured import tool_call_head

    if tool.name is not None:
        return tool.name, text
    for name in tool.names:
        head = tool_call_head(name)
        if text.startswith(head):
            return name, text[len(head):]
    return None


def is_text_answer(tool: ToolMode, text: str) -> bool:
    """auto: the model answered in text (its first character is not a call's "{")."""
    return tool.auto and text[:1] not in ("", "{")


def parse_tool_call(tool: ToolMode, text: str) -> tuple[str, str] | None:
    """(function name, arguments JSON) of a finished constrained output; None if it is text."""
    found = call_so_far(tool, text)
    if found is None:
        return None
    name, arguments = found
    return name, arguments if tool.name is not None else arguments.removesuffix("}")

"""Engine outputs -> OpenAI response bodies and stream chunks (plain dicts, the OpenAI schema).

A `Delta` is what one choice gained since its last chunk: outputs that queued up while the
client was being written to are merged into one, so a slow reader gets fewer, longer chunks.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from lmstack.infer import RequestOutput, TokenLogprob
from lmstack.serve.requests import Job, call_so_far, is_text_answer, parse_tool_call


@dataclass
class Delta:
    index: int
    text: str
    num_tokens: int
    out: RequestOutput  # the newest output (cumulative tokens, logprobs, finish)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        lps = self.out.logprobs or []
        return lps[len(lps) - self.num_tokens:] if self.num_tokens else []


def merge(outs: list[tuple[int, RequestOutput]]) -> list[Delta]:
    """(choice index, output) pairs in arrival order -> one Delta per choice."""
    deltas: dict[int, Delta] = {}
    for index, out in outs:
        d = deltas.get(index)
        if d is None:
            deltas[index] = Delta(index, out.delta_text, len(out.delta_token_ids), out)
        else:
            d.text, d.num_tokens, d.out = d.text + out.delta_text, d.num_tokens + len(out.delta_token_ids), out
    return list(deltas.values())


def usage(job: Job, finals: dict[int, RequestOutput]) -> dict:
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(len(o.token_ids) for o in finals.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n"


def _head(job: Job, obj: str) -> dict:
    prefix = "cmpl" if job.kind == "text_completion" else "chatcmpl"
    return {"id": f"{prefix}-{job.id}", "object": obj, "created": job.created, "model": job.model}


def _finish_reason(job: Job, out: RequestOutput) -> str | None:
    if not out.finished:
        return None
    if _is_call(job, out):
        return "tool_calls"
    return out.finish_reason


def _is_call(job: Job, out: RequestOutput) -> bool:
    """A finished output that is a complete tool call."""
    return (job.tool is not None and out.finish_reason == "stop"
            and parse_tool_call(job.tool, out.text) is not None)


# ----------------------------------------------------------------------------- completions

def completion_body(job: Job, finals: dict[int, RequestOutput], tokenizer) -> dict:
    choices = []
    for k in range(job.num_choices):
        out = finals[k]
        echo = job.echo[k // job.n] if job.echo else ""
        lp = _completion_logprobs(job, out.logprobs, tokenizer, _echoed(job, k))
        choices.append({"index": k, "text": echo + out.text, "finish_reason": out.finish_reason,
                        "logprobs": lp})
    return {**_head(job, "text_completion"), "choices": choices, "usage": usage(job, finals)}


def completion_chunk(job: Job, d: Delta, tokenizer, prefix: str = "") -> dict:
    """A chunk for Delta d; `prefix`: the echoed prompt (the choice's first chunk), whose
    logprobs then come first."""
    echoed = _echoed(job, d.index) if prefix else ([], [])
    lp = None
    if d.num_tokens or prefix:
        lp = _completion_logprobs(job, d.logprobs, tokenizer, echoed)
    choice = {"index": d.index, "text": prefix + d.text, "logprobs": lp,
              "finish_reason": _finish_reason(job, d.out)}
    return {**_head(job, "text_completion"), "choices": [choice]}


def _echoed(job: Job, k: int) -> tuple[list[int], list[TokenLogprob | None]]:
    """Choice k's echoed prompt: its ids and logprobs (the first None), if echo has logprobs."""
    if job.prompt_logprobs is None:
        return [], []
    return job.prompts[k // job.n], job.prompt_logprobs[k // job.n]


def _completion_logprobs(job: Job, lps: list[TokenLogprob] | None, tokenizer,
                         echoed: tuple[list[int], list[TokenLogprob | None]]):
    """OpenAI's legacy logprobs object over the echoed prompt's tokens (if any) and `lps`; the
    first prompt token has null logprob and top_logprobs, as OpenAI's."""
    if job.logprobs is None or lps is None:
        return None
    ids = echoed[0] + [lp.token_id for lp in lps]
    values = echoed[1] + lps
    tokens = [tokenizer.decode([i]) for i in ids]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    top = [None if lp is None else {tokenizer.decode([i]): v for i, v in lp.top.items()}
           for lp in values]
    return {"tokens": tokens, "token_logprobs": [None if lp is None else lp.logprob for lp in values],
            "top_logprobs": top, "text_offset": offsets}


# ----------------------------------------------------------------------------- chat

def chat_body(job: Job, finals: dict[int, RequestOutput], tokenizer) -> dict:
    choices = []
    for k in range(job.num_choices):
        out = finals[k]
        message = _message(job, out)
        lp = {"content": _chat_logprobs(out.logprobs, tokenizer)} if job.logprobs is not None else None
        choices.append({"index": k, "message": message, "logprobs": lp,
                        "finish_reason": _finish_reason(job, out)})
    return {**_head(job, "chat.completion"), "choices": choices, "usage": usage(job, finals)}


def _message(job: Job, out: RequestOutput) -> dict:
    if not _is_call(job, out):
        return {"role": "assistant", "content": out.text, "refusal": None}
    name, arguments = parse_tool_call(job.tool, out.text)
    call = {"id": _call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
    return {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallStream:
    """One streamed choice of a tool-call request, in OpenAI's increments: the call's head
    (index, id, type, name, arguments "") once the name is complete, then chunks of the
    arguments' characters as they are generated. In the {"name","arguments"} form the last
    character is held back until the next one comes (it may be the wrapper's closing brace).
    auto's text answers stream as content; an output cut before its name is complete ends
    with its text as content."""

    def __init__(self, job: Job):
        self.tool = job.tool
        self.sent = 0  # characters of the arguments sent
        self.head_sent = False

    def deltas(self, d: Delta) -> list[dict]:
        out = d.out
        found = call_so_far(self.tool, out.text)
        if found is None:
            if is_text_answer(self.tool, out.text):
                return [{"content": d.text}]
            return [{"content": out.text}] if out.finished else []
        name, arguments = found
        hold = self.tool.name is None and not (out.finished and out.finish_reason == "length")
        end = len(arguments) - hold
        piece, self.sent = arguments[self.sent:end], max(self.sent, end)
        deltas = []
        if not self.head_sent:
            self.head_sent = True
            deltas.append({"tool_calls": [{"index": 0, "id": _call_id(), "type": "function",
                                           "function": {"name": name, "arguments": ""}}]})
        if piece:
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        return deltas


def chat_chunk(job: Job, d: Delta | None, tokenizer, index: int = 0, role: bool = False) -> dict:
    """The first chunk of choice `index` (role=True), or a content chunk for Delta d."""
    if role:
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return {**_head(job, "chat.completion.chunk"), "choices": [choice]}
    return chat_chunks(job, d, tokenizer, [{"content": d.text}])[0]


def chat_chunks(job: Job, d: Delta, tokenizer, deltas: list[dict]) -> list[dict]:
    """Chunks for Delta d carrying `deltas` in turn; the last one has the logprobs and the
    finish reason. No chunk when there is nothing to say."""
    lp = None
    if job.logprobs is not None and d.num_tokens:
        lp = {"content": _chat_logprobs(d.logprobs, tokenizer)}
    if not deltas and (lp is not None or d.out.finished):
        deltas = [{}]
    chunks = []
    for i, delta in enumerate(deltas):
        last = i == len(deltas) - 1
        choice = {"index": d.index, "delta": delta, "logprobs": lp if last else None,
                  "finish_reason": _finish_reason(job, d.out) if last else None}
        chunks.append({**_head(job, "chat.completion.chunk"), "choices": [choice]})
    return chunks


def _chat_logprobs(lps: list[TokenLogprob] | None, tokenizer) -> list[dict]:
    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return [{**entry(lp.token_id, lp.logprob),
             "top_logprobs": [entry(i, v) for i, v in lp.top.items()]} for lp in lps or []]


def usage_chunk(job: Job, finals: dict[int, RequestOutput]) -> dict:
    obj = "text_completion" if job.kind == "text_completion" else "chat.completion.chunk"
    return {**_head(job, obj), "choices": [], "usage": usage(job, finals)}

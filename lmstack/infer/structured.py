"""Structured outputs: grammars (JSON schemas, tool calls) that decide which tokens may come next.

`GrammarCompiler` compiles a grammar once against the tokenizer (llguidance, on CPU) and keeps
the compiled matcher, in its initial state, in a cache keyed by the grammar's text; each request
gets its own copy in a `GrammarConstraint`. Compiling takes a while for large schemas, so the
caller does it where it may block (the server: in a worker thread, off the engine loop), and the
engine only asks constraints for masks and feeds them the sampled tokens (`ModelRunner`).

Masks span the model's whole logit width: ids past the tokenizer's vocabulary (padding rows of
the embedding) are never allowed.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Protocol

import torch

# Compact JSON: no whitespace between tokens (a model that may emit whitespace forever is a
# model that may never finish the object); every keyword llguidance cannot enforce is an error.
JSON_OPTIONS = {"whitespace_flexible": False, "lenient": False}


def tool_call_head(name: str) -> str:
    """What a tool call's text starts with: {"name":NAME,"arguments": (the arguments follow,
    then the closing brace). One fixed, compact form, so a stream can tell the name is complete
    and pass the arguments on as they are generated."""
    return '{"name":' + json.dumps(name) + ',"arguments":'


class Constraint(Protocol):
    """Per-request state deciding the allowed next tokens."""

    def allowed(self, width: int) -> torch.Tensor:
        """(width,) bool: the tokens that may come next."""
        ...

    def accept(self, token: int) -> None: ...

    @property
    def is_finished(self) -> bool:
        """The grammar is complete: the output ends here."""
        ...


class GrammarConstraint:
    """One request's walk through a compiled grammar (an llguidance LLMatcher)."""

    def __init__(self, matcher):
        self.matcher = matcher
        self._bits = torch.arange(32, dtype=torch.int32)

    def allowed(self, width: int) -> torch.Tensor:
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        bits = ((words[:, None] >> self._bits) & 1).flatten().bool()  # bit j of word i: id 32i + j
        mask = torch.zeros(width, dtype=torch.bool)
        n = min(width, bits.numel())
        mask[:n] = bits[:n]
        return mask

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)  # a refused token leaves it in its error state: finished

    @property
    def is_finished(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_error()


class GrammarCompiler:
    """Compiles grammars against one tokenizer for a model `vocab_size` logits wide; thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 256):
        from llguidance import LLTokenizer  # the serve extra; only structured outputs need it

        eos = getattr(tokenizer, "eos_id", None)
        options = {"eos_token": eos} if eos is not None else {}
        self.tokenizer = LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, **options)
        self.cache: OrderedDict[str, object] = OrderedDict()
        self.cache_size = cache_size
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def json_schema(schema: dict | None) -> str:
        """The grammar of JSON values matching `schema` (None: any JSON object)."""
        from llguidance import LLMatcher

        if schema is None:
            schema = {"type": "object"}
        return LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)

    @staticmethod
    def tool_calls(tools: dict[str, dict], text: bool = False) -> str:
        """The grammar of one call of one of `tools` (name -> parameters schema), in the form of
        tool_call_head; text=True: or else free text that does not start with "{" (a model
        that may answer or call, OpenAI's tool_choice "auto"), possibly empty."""
        from llguidance import LLMatcher

        rules = []
        for i, (name, schema) in enumerate(tools.items()):
            schema = {**schema, "x-guidance": JSON_OPTIONS}
            rules += [f'call_{i}: {json.dumps(tool_call_head(name))} args_{i} "}}"',
                      f"args_{i}: %json {json.dumps(schema)}"]
        calls = " | ".join(f"call_{i}" for i in range(len(tools)))
        start = f"start: {calls} | TEXT?" if text else f"start: {calls}"
        lark = "\n".join([start, *rules] + ([r"TEXT: /[^{](.|\n)*/"] if text else []))
        return LLMatcher.grammar_from_lark(lark)

    def constraint(self, grammar: str) -> GrammarConstraint:
        """A fresh constraint for one request; ValueError (llguidance's message, e.g. naming an
        unsupported keyword) if the grammar does not compile."""
        matcher = self._compiled(grammar)
        with self.lock:
            return GrammarConstraint(matcher.deep_copy())

    def _compiled(self, grammar: str):
        from llguidance import LLMatcher

        with self.lock:
            if grammar in self.cache:
                self.hits += 1
                self.cache.move_to_end(grammar)
                return self.cache[grammar]
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)  # drops the GIL while it builds
        if matcher.is_error():
            raise ValueError(f"the schema cannot be enforced: {matcher.get_error()}")
        with self.lock:
            self.misses += 1
            self.cache[grammar] = matcher
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return matcher

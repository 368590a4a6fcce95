"""ServeConfig: the server's own options (`lmstack serve` flags; engine flags are EngineConfig's)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """Server options: where it listens, who may call it, and the limits on one request."""

    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 exposes the server to the network (set --api-key then)."""
    port: int = 8000
    """TCP port to listen on."""
    api_key: str | None = None
    """Required as `Authorization: Bearer KEY` on every /v1 route; none: no check."""
    model_name: str | None = None
    """The model's id in /v1/models and requests; none: MODEL's directory name."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (413 above)."""
    max_n: int = 16
    """Most choices (n) one request may ask for."""
    max_tokens: int | None = None
    """Most tokens one request may ask for; none: the context length."""
    max_prompt_tokens: int | None = None
    """Longest prompt accepted, in tokens; none: the context length less one."""
    max_waiting: int = 256
    """Requests that may wait beyond the max-num-seqs running ones; more get 429."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: how long in-flight requests may run on before they are aborted."""
    grammar_cache_size: int = 256
    """Compiled structured-output grammars kept (by schema)."""
    engine_process: bool = True
    """Run the engine in a process of its own, so that HTTP work and engine steps use two
    cores instead of sharing one GIL; false: in a thread of the server's process."""

    def __post_init__(self) -> None:
        checks = [("port", 0 <= self.port < 65536), ("max_body_bytes", self.max_body_bytes > 0),
                  ("max_n", self.max_n >= 1), ("max_waiting", self.max_waiting >= 0),
                  ("max_tokens", self.max_tokens is None or self.max_tokens >= 1),
                  ("max_prompt_tokens", self.max_prompt_tokens is None or self.max_prompt_tokens >= 1),
                  ("drain_timeout_s", self.drain_timeout_s >= 0)]
        for name, ok in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)!r} is out of range")

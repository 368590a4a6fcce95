"""Inference: sampling, paged-KV bookkeeping, continuous-batching scheduler, model runner, `LLM`."""

from lmstack.infer.engine import LLM, EngineConfig
from lmstack.infer.outputs import RequestMetrics, RequestOutput, TokenLogprob
from lmstack.infer.sampling import SamplingParams

__all__ = ["LLM", "EngineConfig", "RequestMetrics", "RequestOutput", "SamplingParams", "TokenLogprob"]

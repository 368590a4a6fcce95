"""The model layer: config, Transformer, caches, reference generation, HF interop, tokenizer."""

from lmstack.model.cache import StaticCache
from lmstack.model.config import PRESETS, ModelConfig, RopeScaling
from lmstack.model.generate import generate
from lmstack.model.transformer import Transformer

__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "StaticCache", "Transformer", "generate"]

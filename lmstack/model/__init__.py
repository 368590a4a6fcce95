"""The model layer: config, Transformer, caches, reference generation, HF interop, tokenizer."""

from lmstack.model.cache import StaticCache
from lmstack.model.config import PRESETS, ModelConfig, RopeScaling
from lmstack.model.generate import generate
from lmstack.model.hf import load_hf, save_hf
from lmstack.model.tokenizer import Tokenizer
from lmstack.model.transformer import Transformer

__all__ = [
    "PRESETS", "ModelConfig", "RopeScaling", "StaticCache", "Tokenizer", "Transformer", "generate",
    "load_hf", "save_hf",
]

"""The data layer: text sources -> token shards (+ meta.json) -> resumable pretraining batches."""

from lmstack.data.shards import load_meta, prepare
from lmstack.data.sources import SourceStats, builtin_corpus, iter_documents, list_files
from lmstack.data.stream import TokenStream

__all__ = ["SourceStats", "TokenStream", "builtin_corpus", "iter_documents", "list_files", "load_meta",
           "prepare"]

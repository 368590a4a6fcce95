"""CompiledDecode: the model's decode steps through torch.compile (one new token per lane, or
k + 1 when a speculative step verifies k draft tokens: a few fixed widths, each its own graph;
within a width, a graph for a single lane, one for every batch of a few lanes and one for
every larger batch, each for every context length).

A decode step of a small batch reads every weight once to compute a few rows, and runs ~50
small ops per layer besides. Inductor fuses those ops into a few generated kernels. How the
products run depends on the step's size:
- one lane (one request's decode step, a speculative verify or draft step) or at most
  `frozen_max_rows` rows (8 for fp32 weights, 4 for bf16): with `freezing` the weights become
  constants that inductor lays out once; on CPU `max_autotune` with the C++ GEMM template generates matrix-vector products that
  stream bf16 weights at 20-33 GB/s where oneDNN's packed linear reaches 12-25 (Zen 4, one-off
  measurement of the llama-150m shapes);
- more rows over several lanes, on CPU: the linears stay oneDNN calls on the model's packed
  copies (an opaque custom op, `transformer.packed_linear_op`), and nothing is frozen. At
  35-64 rows oneDNN's packed products ran at 165-220 GFLOP/s (fp32, llama-10m shapes) where
  the C++ template ran at 70-90 inside the graph (one-off measurements, Zen 4); a 64-lane step
  at 128 tokens of context took 12.8 ms against 16.8 ms. llama-150m bf16, 2 / 4 / 6 / 8 / 16
  requests decoding together (`benchmarks/serve_throughput.py --parts b --quick
  --decode-batches 2 4 6 8 16`): 173 / 302 / 319 / 250 / 263 tokens/s through the C++
  template, 103 / 211 / 275 / 353 / 501 through oneDNN; an earlier one-off script had 6
  requests the other way (345 vs 402).
Attention in every compiled decode step on CPU reads each lane's keys and values from the
paged pool in place (flex_attention over the lanes' block ids, `paged.LaneBlocks`) instead of
gathering them into a padded copy first; eager ones copy each lane's own blocks and attend
block by block (`LaneBlocks.attend_by_block`).
Prefill chunks stay eager: their shapes change every step.

Frozen weights are copies: if the model's weights change after the first compiled step (an
optimizer step, `load_state_dict`, a LoRA merge), the graphs of few rows would compute with
the old ones. Every call therefore checks each weight's identity, data pointer and version counter and,
once anything changed, runs the eager model from then on (with a warning). A failed compilation
does the same. Either way the tokens stay right; only the speed is lost.

The compiled code and its weight copies stay in memory until the process ends, even after the
engine is gone (measured: ~1 copy of the weights per compilation, not freed by
`torch._dynamo.reset()` either; graphs of many rows hold no copies: a second compilation
of them over llama-50m fp32, 190 MB of weights, added 15 MB of RSS, of one-lane graphs 512 MB).
So engines share one CompiledDecode per model
(`for_model`, kept on the model): a second engine over unchanged weights compiles nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import types
import warnings

import torch

from lmstack.model import transformer

# inductor options for decode steps; on CPU the C++ GEMM template only (autotuning against
# oneDNN's kernel benchmarks both with the weights in cache and picks oneDNN's, which is slower
# when the weights stream from memory, as they do in decode)
OPTIONS = {"freezing": True}
CPU_OPTIONS = {**OPTIONS, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}
FROZEN_ROWS_PER_WEIGHT_BYTE = 2
"""On CPU, steps of several lanes run inductor's C++ GEMM on frozen weights up to this many rows
per byte of a weight element, and oneDNN's packed linears above (see frozen_max_rows)."""


def frozen_max_rows(dtype: torch.dtype) -> int:
    """The most rows a multi-lane CPU step runs on frozen weights: 8 for fp32, 4 for bf16.

    The C++ GEMM streams weights faster and computes slower than oneDNN, so it wins while a
    product is bound by reading its weights, and a weight of more bytes keeps it bound for
    more rows. Measured crossovers (Zen 4, 2 threads): llama-150m bf16 between 4 and 8 rows
    (6 either way in two runs; see above). fp32, the serving benchmark's (a) log-uniform
    workload in a one-off script, medians of alternating rounds in one process at limits
    4 / 8 / 12 rows: llama-10m 2,925 / 2,982 / 3,041 tokens/s, llama-50m 662 / 673 / 670;
    uniform, llama-10m at 4 / 12: 2,529 / 2,523."""
    return FROZEN_ROWS_PER_WEIGHT_BYTE * dtype.itemsize


_ids = itertools.count()


class _Snapshot:
    """Which module, parameter and buffer objects a model holds, and each tensor's data pointer
    and version counter: `changed()` is True after a replacement (`.weight = ...`, a LoRA
    wrapper swapped in), a `.data =` or any in-place write (writes through `.data`, which has a
    version counter of its own, go unseen). ~0.04 ms for a 12-layer model."""

    def __init__(self, model: torch.nn.Module):
        self.entries = [(slots, name, obj) for m in model.modules()
                        for slots in (m._modules, m._parameters, m._buffers)
                        for name, obj in slots.items()]
        self.tensors = [(t, t.data_ptr(), t._version) for _, _, t in self.entries
                        if isinstance(t, torch.Tensor)]

    def changed(self) -> bool:
        return (any(slots.get(name) is not obj for slots, name, obj in self.entries)
                or any(t.data_ptr() != ptr or t._version != v for t, ptr, v in self.tensors))


@contextlib.contextmanager
def _packed_in_graphs(on: bool):
    """Code traced inside runs linears as `transformer.packed_linear_op` (if on). Dynamo guards
    the flag it reads, so graphs traced with and without it are told apart."""
    old, transformer.PACKED_IN_GRAPHS = transformer.PACKED_IN_GRAPHS, on
    try:
        yield
    finally:
        transformer.PACKED_IN_GRAPHS = old


def _decode_step(model, tokens, positions, cache, logits_index):
    return model(tokens, positions, cache=cache, logits_index=logits_index)


class CompiledDecode:
    """Call as the model: `(tokens, positions, cache=meta, logits_index=...)` for decode steps."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.options = CPU_OPTIONS if model.embed_tokens.weight.device.type == "cpu" else OPTIONS
        # a code object of its own to compile: dynamo keeps compiled code per code object,
        # guarded by shapes and types but not by weight values, so a compile of the model's own
        # forward would hand a later CompiledDecode of the same model the first one's frozen
        # (maybe since changed) weights
        code = _decode_step.__code__.replace(co_name=f"decode_step_{next(_ids)}")
        # no guards on the model's modules and parameters: _Snapshot checks their identity,
        # data pointers and versions before every call, where dynamo's checks of them took
        # ~250 us of its ~400 us of guards per llama-10m step (one-off profile; torch >= 2.6)
        skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        self.compiled = torch.compile(types.FunctionType(code, _decode_step.__globals__),
                                      options={"guard_filter_fn": skip} if skip else None)
        self.snapshot: _Snapshot | None = None  # the weights the compiler froze: taken at the first call
        self.eager_reason: str | None = None
        """Why decode steps now run eagerly; None while they run compiled."""

    @classmethod
    def for_model(cls, model: torch.nn.Module, renew: bool = False) -> CompiledDecode:
        """The CompiledDecode an earlier engine made for this model, while it still runs
        compiled with unchanged weights (no second compilation, no second copy); else, or with
        `renew` (weights changed in a way the snapshot cannot see), a new one."""
        current = getattr(model, "compiled_decode", None)
        if (renew or current is None or current.eager_reason is not None
                or current.snapshot is not None and current.snapshot.changed()):
            current = model.compiled_decode = cls(model)
        return current

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache,
                 logits_index: torch.Tensor | None = None) -> torch.Tensor:
        if self.snapshot is None:
            self.snapshot = _Snapshot(self.model)
        elif self.eager_reason is None and self.snapshot.changed():
            self._run_eager("the model's weights changed after compilation (the compiled steps "
                            "hold copies); llm.weights_changed() or a new LLM compiles the new weights")
        if self.eager_reason is not None:
            return self.model(tokens, positions, cache=cache, logits_index=logits_index)
        # key slots grow with the context: one graph for every length, not one per block
        blocks = cache.lane_blocks
        torch._dynamo.maybe_mark_dynamic(cache.attn_mask, 3)
        torch._dynamo.maybe_mark_dynamic(cache.key_blocks, 1)
        if blocks is not None:
            torch._dynamo.maybe_mark_dynamic(blocks.full, 3)
        several = tokens.shape[0] > 1
        if several:  # and the batch changes every few steps: dynamic from the start
            per_lane = (tokens, positions, logits_index, cache.query_lens, cache.context_lens,
                        cache.new_index, cache.logits_rows, cache.slot_mapping, cache.key_blocks,
                        cache.attn_mask)
            if blocks is not None:
                per_lane += (blocks.full_count, blocks.full, blocks.last, blocks.last_fill)
            for t in per_lane:
                if t is not None:  # logits_index: None for every position's logits
                    torch._dynamo.maybe_mark_dynamic(t, 0)
        # more rows on CPU: oneDNN's packed linears as opaque calls, no frozen copies
        packed = (self.options is CPU_OPTIONS and several
                  and tokens.numel() > frozen_max_rows(self.model.embed_tokens.weight.dtype))
        options = {} if packed else self.options
        try:
            with torch._inductor.config.patch(options), _packed_in_graphs(packed):
                return self.compiled(self.model, tokens, positions, cache, logits_index)
        except torch._dynamo.exc.TorchDynamoException as e:  # the compiler's, not the step's
            self._run_eager(f"compilation failed ({type(e).__name__}: {str(e).splitlines()[0]})")
            return self.model(tokens, positions, cache=cache, logits_index=logits_index)

    # a copied or pickled model gets none: the compiled code belongs to this model's weights
    def __deepcopy__(self, memo) -> None:
        return None

    def __reduce__(self):
        return type(None), ()  # unpickles as None

    def _run_eager(self, reason: str) -> None:
        self.eager_reason = reason
        warnings.warn(f"compiled decode: {reason}; decode steps run eagerly from now on",
                      RuntimeWarning, stacklevel=3)

"""CompiledDecode: the model's decode steps through torch.compile.

Decode steps have one new token per lane, or k + 1 when a speculative step verifies k draft
tokens: a few fixed widths, each its own graphs. Prefill chunks stay eager: their shapes change
every step. A decode step of a small batch reads every weight once to compute a few rows and
runs ~50 small ops per layer besides; inductor fuses those ops into a few kernels. The
products run in one of two variants, and the rows rule (`decode_variant`, a pure function)
says which should be faster:
- few rows (at most `frozen_max_rows`), or any step on CUDA: the weights are frozen into the
  graph as constants that inductor lays out once, and on CPU its C++ GEMM template runs the
  products; it streams weights faster than oneDNN while a product is bound by reading them;
- more rows on CPU: the linears stay oneDNN products on the kernels' packed copies, run as an
  opaque op (`kernels.graph_view`), and nothing is frozen: oneDNN computes faster once a
  product is bound by arithmetic.
Steps of one lane and of several get graphs of their own (the batch of several is dynamic).
Attention in compiled CPU decode steps reads each lane's keys and values from the paged pool in
place (`AttnMetadata.attention == "flex"`).

Which of these runs fastest depends on the model, its dtype and the machine (the rows rule
holds on some CPUs and not on others), so it is measured: the first steps of each kind (one
lane or several; few rows or many, by the rows rule; the step's width) take turns, once
compiled, among the frozen-weight graphs, the packed-weight graphs (CPU) and the eager model
(all give the same tokens), and the fastest per row runs that kind of step from then on; if it
is the eager model, with one warning. `probe_steps=0` times nothing and follows the rows rule.

Frozen weights are copies: if the model's weights change after the first compiled step (an
optimizer step, `load_state_dict`, a LoRA merge), frozen graphs would compute with the old
ones. Every step therefore checks each weight's identity, data pointer and version counter and,
once anything changed, runs the eager model from then on (with a warning). A variant whose
compilation fails is dropped (with a warning) and the other one runs its steps (CPU; e.g. the
frozen graphs allow only inductor's C++ templates, which have no int4 product on CPUs without
AVX-512, where the packed-weight graphs call ATen's int4 kernel on bf16 activations); once every
variant has failed, the eager model runs. Either way the tokens stay right; only the speed is
lost.
The compiled code and its weight copies stay in memory until the process ends, even after the
engine is gone, so engines share one CompiledDecode per model through a `CompileCache`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
import types
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from lmstack.kernels import activation_like, graph_view

# inductor options for frozen decode steps; on CPU the C++ GEMM template only (autotuning
# against oneDNN benchmarks both with the weights in cache and picks oneDNN's, which is slower
# when the weights stream from memory, as they do in decode)
FROZEN = {"freezing": True}
CPU_FROZEN = {**FROZEN, "max_autotune": True, "max_autotune_gemm_backends": "CPP"}


class Variant(Enum):
    FROZEN = "frozen-weight"
    """Inductor runs the products on weights frozen into the graph."""
    PACKED = "packed-weight"
    """oneDNN runs the products on the kernels' packed copies, as an opaque op (CPU)."""


def frozen_max_rows(dtype: torch.dtype) -> int:
    """The most rows a multi-lane CPU step runs on frozen weights: 2 per byte of a weight
    element (8 for fp32, 4 for bf16). A product of R rows does 2R FLOPs per weight element it
    reads, so a weight of more bytes per element keeps it bound by memory (where the C++ GEMM's
    streaming wins) for proportionally more rows."""
    return 2 * dtype.itemsize


def decode_variant(rows: int, max_frozen_rows: int, on_cpu: bool) -> Variant:
    """Which compiled graphs a decode step of `rows` rows (tokens) runs."""
    return Variant.FROZEN if not on_cpu or rows <= max_frozen_rows else Variant.PACKED


_ids = itertools.count()


def _decode_step(model, tokens, positions, cache, logits_index):
    return model(tokens, positions, cache=cache, logits_index=logits_index)


def _compiled_step() -> Callable:
    """torch.compile of a code object of its own: dynamo keeps compiled code per code object,
    guarded by shapes and types but not by weight values, so sharing one would hand a later
    CompiledDecode the first one's frozen (maybe since changed) weights. No guards on the
    model's modules and parameters: _Snapshot checks them before every step, far cheaper.
    fullgraph: a graph break would leave parts of the step (or all of it, when dynamo gives up
    on the frame) running eagerly, unannounced; it raises instead, and the step falls back to
    the eager model with a warning that names it."""
    code = _decode_step.__code__.replace(co_name=f"decode_step_{next(_ids)}")
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    return torch.compile(types.FunctionType(code, _decode_step.__globals__), fullgraph=True,
                         options={"guard_filter_fn": skip} if skip else None)


class _Snapshot:
    """Which module, parameter and buffer objects a model holds, and each tensor's data pointer
    and version counter: `changed()` is True after a replacement (`.weight = ...`, a LoRA
    wrapper swapped in), a `.data =` or any in-place write (writes through `.data`, which has a
    version counter of its own, go unseen)."""

    def __init__(self, model: torch.nn.Module):
        self.entries = [(slots, name, obj) for m in model.modules()
                        for slots in (m._modules, m._parameters, m._buffers)
                        for name, obj in slots.items()]
        self.tensors = [(t, t.data_ptr(), t._version) for _, _, t in self.entries
                        if isinstance(t, torch.Tensor)]

    def changed(self) -> bool:
        return (any(slots.get(name) is not obj for slots, name, obj in self.entries)
                or any(t.data_ptr() != ptr or t._version != v for t, ptr, v in self.tensors))


EAGER = None
"""A probe's candidate for the eager model."""


@dataclass
class _Probe:
    """One kind of decode step: each candidate's timings per row (seconds), until a verdict."""

    candidates: tuple[Variant | None, ...]
    """The compiled variants to try, then EAGER."""
    timings: dict[Variant | None, list[float]] = field(default_factory=dict)
    warm: set[Variant] = field(default_factory=set)
    """Variants whose first compiled step (which compiles, untimed) has run."""
    decided: bool = False
    choice: Variant | None = EAGER
    """What runs this kind of step once decided: a variant, or EAGER."""

    def next_turn(self) -> Variant | None:
        """The candidate that runs the next step while undecided: a variant not yet compiled,
        else the one with the fewest timings."""
        cold = [c for c in self.candidates if c is not EAGER and c not in self.warm]
        if cold:
            return cold[0]
        return min(self.candidates, key=lambda c: len(self.timings.get(c, ())))

    def ready(self, probe_steps: int) -> bool:
        return all(len(self.timings.get(c, ())) >= probe_steps for c in self.candidates)

    def drop(self, failed) -> None:
        """Take the `failed` variants out of the running (and out of a verdict for one)."""
        self.candidates = tuple(c for c in self.candidates if c not in failed)
        if self.choice in failed:
            self.decided, self.choice = False, EAGER

    def decide(self) -> None:
        """Keep the candidate of the lowest best time per row (the earlier one on a tie)."""
        best = {c: min(self.timings[c]) for c in self.candidates}
        self.choice = min(self.candidates, key=best.__getitem__)
        self.decided = True


class CompiledDecode:
    """Compiled decode steps of one model; `step_for(lanes, width)` says what runs the next one."""

    def __init__(self, model: torch.nn.Module, probe_steps: int = 3,
                 max_frozen_rows: int | None = None):
        self.model = model
        weight = activation_like(model)
        self.on_cpu = weight.device.type == "cpu"
        self.max_frozen_rows = frozen_max_rows(weight.dtype) if max_frozen_rows is None else max_frozen_rows
        """Steps of more rows run the PACKED variant (CPU); default: frozen_max_rows."""
        self.frozen, self.graph = _compiled_step(), _compiled_step()
        self._steps = {v: functools.partial(self._run, v) for v in Variant}
        """Each variant's step, with the model's signature (made once, not per step)."""
        self._graph_model: torch.nn.Module | None = None
        self.probe_steps = probe_steps
        self.probes: dict[tuple[Variant, bool, int], _Probe] = {}  # (variant, one lane, width)
        self.snapshot: _Snapshot | None = None  # the weights the compiler froze: taken at the first step
        self.eager_reason: str | None = None
        """Why decode steps now run eagerly; None while they run compiled."""
        self.failed: dict[Variant, str] = {}
        """Variants whose compilation failed, and why: they run no more steps."""

    @property
    def current(self) -> bool:
        """Still compiling steps, over the weights it first saw."""
        return self.eager_reason is None and not (self.snapshot is not None and self.snapshot.changed())

    def step_for(self, lanes: int, width: int) -> tuple[Callable, bool]:
        """What runs the next decode step of `lanes` lanes of `width` tokens: a callable with the
        model's signature, and whether it is compiled (the step's metadata depends on it)."""
        if self.snapshot is None:
            self.snapshot = _Snapshot(self.model)
        elif self.eager_reason is None and self.snapshot.changed():
            self._run_eager("the model's weights changed after compilation (the compiled steps "
                            "hold copies); llm.weights_changed() or a new LLM compiles the new weights")
        if self.eager_reason is not None:
            return self.model, False
        rows = lanes * width
        rule = decode_variant(rows, self.max_frozen_rows, self.on_cpu)
        if not self.probe_steps:
            return self._steps[self._usable()[0] if rule in self.failed else rule], True
        probe = self.probes.get((rule, lanes == 1, width))
        if probe is None:
            others = [v for v in Variant if v is not rule] if self.on_cpu else []
            probe = self.probes[rule, lanes == 1, width] = _Probe((rule, *others, EAGER))
        if any(c in self.failed for c in probe.candidates):
            probe.drop(self.failed)
        if not probe.decided and probe.ready(self.probe_steps):
            probe.decide()
            self._report(probe, lanes == 1, width)
        if probe.decided:
            choice = probe.choice
            return (self.model, False) if choice is EAGER else (self._steps[choice], True)
        turn = probe.next_turn()
        if turn is not EAGER and turn not in probe.warm:
            probe.warm.add(turn)
            return self._steps[turn], True  # this call compiles: not timed
        run = self.model if turn is EAGER else self._steps[turn]
        return self._timed(run, probe.timings.setdefault(turn, []), rows), turn is not EAGER

    @staticmethod
    def _report(probe: _Probe, one_lane: bool, width: int) -> None:
        if probe.choice is not EAGER:
            return
        lanes = "one lane" if one_lane else "several lanes"
        compiled = ", ".join(f"{c.value} {min(probe.timings[c]) * 1e3:.3f}" for c in probe.candidates
                             if c is not EAGER)
        warnings.warn(f"compiled decode: steps of {lanes}, {width} token(s) each, took "
                      f"{min(probe.timings[EAGER]) * 1e3:.3f} ms per row eager against {compiled} "
                      f"compiled (best of {len(probe.timings[EAGER])}); they run eagerly from now on",
                      RuntimeWarning, stacklevel=5)

    def _timed(self, run: Callable, timings: list[float], rows: int) -> Callable:
        def timed(*args, **kwargs):
            sync = torch.cuda.synchronize if not self.on_cpu else (lambda: None)
            sync()
            start = time.perf_counter()
            out = run(*args, **kwargs)
            sync()
            timings.append((time.perf_counter() - start) / rows)
            return out
        return timed

    def _run(self, variant: Variant, tokens: torch.Tensor, positions: torch.Tensor, cache,
             logits_index: torch.Tensor | None = None) -> torch.Tensor:
        self._mark_dynamic(tokens, positions, cache, logits_index)
        many = variant is Variant.PACKED
        if many and self._graph_model is None:
            self._graph_model = graph_view(self.model)
        options = {} if many else CPU_FROZEN if self.on_cpu else FROZEN
        step, model = (self.graph, self._graph_model) if many else (self.frozen, self.model)
        try:
            with torch._inductor.config.patch(options):
                return step(model, tokens, positions, cache, logits_index)
        except torch._dynamo.exc.TorchDynamoException as e:  # the compiler's, not the step's
            self._fail(variant, f"compilation failed ({type(e).__name__}: {str(e).splitlines()[0]})")
            eager = dataclasses.replace(cache, attention="gather")  # "flex" is for traced code
            return self.model(tokens, positions, cache=eager, logits_index=logits_index)

    def _usable(self) -> list[Variant]:
        """The variants that have not failed (on CUDA only frozen graphs run)."""
        return [v for v in Variant if v not in self.failed and (self.on_cpu or v is Variant.FROZEN)]

    def _fail(self, variant: Variant, reason: str) -> None:
        self.failed[variant] = reason
        if not self._usable():
            self._run_eager(reason)
        else:
            warnings.warn(f"compiled decode: {variant.value} graphs: {reason}; steps run the other "
                          "compiled variant (or eagerly, where that is faster)", RuntimeWarning, stacklevel=4)

    @staticmethod
    def _mark_dynamic(tokens, positions, cache, logits_index) -> None:
        """Key slots grow with the context: one graph for every length, not one per block; and
        a batch of several lanes changes every few steps: dynamic from the start."""
        blocks = cache.lane_blocks if cache.attention == "flex" else None
        torch._dynamo.maybe_mark_dynamic(cache.attn_mask, 3)
        torch._dynamo.maybe_mark_dynamic(cache.key_blocks, 1)
        if blocks is not None:
            torch._dynamo.maybe_mark_dynamic(blocks.full, 3)
        if tokens.shape[0] == 1:
            return
        per_lane = [tokens, positions, logits_index, cache.query_lens, cache.context_lens,
                    cache.new_index, cache.logits_rows, cache.slot_mapping, cache.key_blocks,
                    cache.attn_mask]
        if blocks is not None:
            per_lane += [blocks.full_count, blocks.full, blocks.last, blocks.last_fill]
        for t in per_lane:
            if t is not None:  # logits_index: None for every position's logits
                torch._dynamo.maybe_mark_dynamic(t, 0)

    def _run_eager(self, reason: str) -> None:
        self.eager_reason = reason
        warnings.warn(f"compiled decode: {reason}; decode steps run eagerly from now on",
                      RuntimeWarning, stacklevel=4)


class CompileCache:
    """One CompiledDecode per model, shared by the engines over it: a second engine over
    unchanged weights compiles nothing (and holds no second copy of them)."""

    def __init__(self):
        self._by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, model: torch.nn.Module, renew: bool = False, probe_steps: int = 3,
            max_frozen_rows: int | None = None) -> CompiledDecode:
        """The model's CompiledDecode while it is still current and made with these options;
        else, or with `renew` (weights changed in a way the snapshot cannot see), a new one."""
        current = self._by_model.get(model)
        if (renew or current is None or not current.current or current.probe_steps != probe_steps
                or max_frozen_rows is not None and current.max_frozen_rows != max_frozen_rows):
            current = self._by_model[model] = CompiledDecode(model, probe_steps, max_frozen_rows)
        return current


SHARED = CompileCache()
"""The cache engines use unless given one."""

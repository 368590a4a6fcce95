"""Kernels swapped into the model from outside: oneDNN-packed linears against F.linear, the
stacked and fused fanouts, staleness of packed copies, and the model layer left untouched."""

import copy
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lmstack.model
from lmstack.kernels import CPU_PACKED, FUSED, drop_copies, graph_view, packed, swap_linears
from lmstack.model import ModelConfig, Transformer
from lmstack.model.cpu import cpu_flags

needs_mkldnn = pytest.mark.skipif(not packed.MKLDNN, reason="this torch build has no oneDNN")


def _counting(monkeypatch) -> list[int]:
    """Counts products served by a packed copy."""
    calls, real = [], packed.PackedWeight.__call__
    monkeypatch.setattr(packed.PackedWeight, "__call__",
                        lambda self, *a: calls.append(1) or real(self, *a))
    return calls


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 2e-2


@needs_mkldnn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 24), (1, 2, 24), (3, 5, 24), (300, 24)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(dtype, shape, bias, monkeypatch):
    """Eager inference runs on a packed copy with F.linear's result; autocast and autograd see
    F.linear; a weight changed in place or replaced gets a new copy at the next call."""
    torch.manual_seed(3)
    layer = packed.PackedLinear.from_linear(nn.Linear(24, 40, bias=bias).to(dtype))
    if not packed.PackedWeight.supports(layer.weight):
        pytest.skip("bf16 is packed only on CPUs with native bf16")
    x = torch.randn(shape, dtype=dtype)
    calls = _counting(monkeypatch)
    expected = lambda: F.linear(x, layer.weight, layer.bias)  # noqa: E731
    with torch.no_grad():
        out = layer(x)
        assert calls == [1] and out.shape == expected().shape
        torch.testing.assert_close(out, expected(), rtol=_tol(dtype), atol=_tol(dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x)  # autocast must see F.linear
    layer(x).sum().backward()  # with autograd: F.linear, and gradients flow
    assert calls == [1] and layer.weight.grad is not None
    with torch.no_grad():
        first = packed.COPIES[layer.weight]
        layer.weight.mul_(2)  # in place: a new copy
        torch.testing.assert_close(layer(x), expected(), rtol=_tol(dtype), atol=_tol(dtype))
        assert packed.COPIES[layer.weight] is not first and len(calls) == 2
        layer.weight.data = torch.randn_like(layer.weight)  # replaced storage: a new copy
        torch.testing.assert_close(layer(x), expected(), rtol=_tol(dtype), atol=_tol(dtype))
        layer.weight.data.copy_(torch.randn_like(layer.weight))  # unseen until drop_copies
        assert (layer(x) - expected()).abs().max() > 0.1
        drop_copies(layer)
        torch.testing.assert_close(layer(x), expected(), rtol=_tol(dtype), atol=_tol(dtype))


@needs_mkldnn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_op_stacks_weights_and_falls_back(dtype, monkeypatch):
    """The op compiled graphs call: weights stacked (q/k/v) as one packed product equal to the
    separate products; a stale member gets a new stacked copy; unsupported inputs run F.linear."""
    torch.manual_seed(4)
    a, b = nn.Linear(24, 40).to(dtype), nn.Linear(24, 8).to(dtype)
    if not packed.PackedWeight.supports(a.weight):
        pytest.skip("bf16 is packed only on CPUs with native bf16")
    x = torch.randn(3, 5, 24, dtype=dtype)
    calls = _counting(monkeypatch)
    weights, biases = [a.weight, b.weight], [a.bias, b.bias]
    expected = lambda: torch.cat([a(x), b(x)], -1)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(packed.packed_linear_op(x, weights, biases), expected(),
                                   rtol=_tol(dtype), atol=_tol(dtype))
        b.weight.add_(1)  # one stale member
        torch.testing.assert_close(packed.packed_linear_op(x, weights, biases), expected(),
                                   rtol=_tol(dtype), atol=_tol(dtype))
        assert calls == [1, 1] and packed.COPIES[a.weight].current(weights)
        other = torch.randn(3, 24, dtype=torch.float64)  # oneDNN does not serve fp64
        w64 = a.weight.double()
        torch.testing.assert_close(packed.packed_linear_op(other, [w64], [None]), F.linear(other, w64))
        assert calls == [1, 1]


class Shifted(nn.Module):
    """A wrapper around a linear, as LoRA is: it keeps the weight but computes something else."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 0.5


def _tiny(preset="tiny-llama"):
    return Transformer.build(ModelConfig.from_preset(preset), seed=0).eval()


@needs_mkldnn
def test_packed_fanout_follows_a_module_swapped_in(monkeypatch):
    """q/k/v run as one product only while all three are plain linears: a wrapper swapped in
    for q_proj (before or after the kernels) runs as itself, around a packed base."""
    models, reference = [_tiny(), _tiny()], _tiny()
    x = torch.randint(0, reference.config.vocab_size, (2, 9))
    models[0].layers[0].self_attn.q_proj = Shifted(models[0].layers[0].self_attn.q_proj)
    for m in models:
        swap_linears(m, CPU_PACKED)
    models[1].layers[0].self_attn.q_proj = Shifted(models[1].layers[0].self_attn.q_proj)
    reference.layers[0].self_attn.q_proj = Shifted(reference.layers[0].self_attn.q_proj)
    assert isinstance(models[0].layers[0].self_attn.q_proj.inner, packed.PackedLinear)
    calls = _counting(monkeypatch)
    with torch.no_grad():
        expected = reference(x)
        for m in models:
            calls.clear()
            torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
            assert calls  # the other products still ran packed


@needs_mkldnn
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_swapped_model_keeps_parameters_and_logits(preset, monkeypatch):
    """swap_linears replaces every linear, fanout and tied head, keeps every Parameter object
    and state_dict key, gives the same logits, is idempotent, and after a training step
    computes with the new weights."""
    model = _tiny(preset)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = model(x)
        n = swap_linears(model, CPU_PACKED)
        calls = _counting(monkeypatch)
        out = model(x)
    n_linears = sum(type(m) is packed.PackedLinear for m in model.modules())
    n_fanouts = sum(type(m) is packed.PackedFanout for m in model.modules())
    assert n == n_linears + n_fanouts + (model.lm_head is None)
    assert n_fanouts == model.config.n_layers * (2 if preset == "tiny-llama" else 1)
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[k] for k, p in model.named_parameters()) and list(model.state_dict()) == keys
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # q/k/v and gate/up as one product each: fewer products than linears
    stacked_members = 3 * model.config.n_layers + (2 * model.config.n_layers if preset == "tiny-llama" else 0)
    assert len(calls) == n_linears - stacked_members + n_fanouts + (model.lm_head is None)
    assert swap_linears(model, CPU_PACKED) == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(x).logsumexp(-1).mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model(x)
        plain = _tiny(preset)
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(after, plain(x), rtol=1e-5, atol=1e-5)
    assert (after - expected).abs().max() > 1e-3  # the update did change the logits


@needs_mkldnn
def test_swapped_model_can_be_copied_and_saved_whole():
    """deepcopy and torch.save of a model with kernels work (no oneDNN tensor is module state):
    the copy has Parameters of its own and the same logits."""
    model = _tiny()
    swap_linears(model, CPU_PACKED)
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        expected = model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert other.embed_tokens.weight is not model.embed_tokens.weight
        with torch.no_grad():
            torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)


@needs_mkldnn
def test_graph_view_shares_parameters_and_runs_the_op():
    """graph_view: the same Parameters, the same logits, its products through the opaque op
    (the eager model's kernels call oneDNN directly)."""
    model = _tiny()
    swap_linears(model, CPU_PACKED)
    view = graph_view(model)
    assert all(p is q for p, q in zip(model.parameters(), view.parameters(), strict=True))
    x = torch.randint(0, model.config.vocab_size, (2, 9))

    def op_calls(m):
        with torch.no_grad(), torch.profiler.profile() as prof:
            out = m(x)
        return out, sum(e.name == "lmstack::packed_linear" for e in prof.events())

    (got, n_view), (expected, n_model) = op_calls(view), op_calls(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # per layer: the q/k/v fanout, o_proj, the gate/up fanout, down_proj; then the head
    assert n_model == 0 and n_view == 4 * model.config.n_layers + 1


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_fused_fanout_trains_like_separate_projections(preset):
    """FUSED runs q/k/v (and gate/up) as one product with autograd: the same loss and
    gradients as the separate linears, the same Parameters."""
    plain, fused = _tiny(preset).train(), _tiny(preset).train()
    assert swap_linears(fused, FUSED) > 0
    x = torch.randint(0, plain.config.vocab_size, (2, 12))
    for m in (plain, fused):
        m(x).logsumexp(-1).mean().backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    fused.layers[0].self_attn.k_proj = Shifted(fused.layers[0].self_attn.k_proj)
    plain.layers[0].self_attn.k_proj = Shifted(plain.layers[0].self_attn.k_proj)
    with torch.no_grad():  # a wrapper among the members: one by one again
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


def test_the_model_layer_uses_no_private_torch_api():
    """lmstack.model calls only public PyTorch: no torch.ops, no torch._*, no tensor._* methods."""
    root = Path(lmstack.model.__file__).parent
    private = re.compile(r"torch\.ops\.|torch\._\w|\.(_version|_base|_cdata|_typed_storage)\b")
    found = [f"{path.name}:{i}: {line.strip()}" for path in sorted(root.glob("*.py"))
             for i, line in enumerate(path.read_text().splitlines(), 1) if private.search(line)]
    assert not found, "\n".join(found)


def test_cpu_flags_read_x86_and_arm_cpuinfo():
    x86 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"
    assert {"avx2", "amx_bf16"} <= cpu_flags(x86) and "bf16" in cpu_flags(arm)
    assert cpu_flags("") == set()


def test_importing_the_model_registers_no_ops_and_other_packages_write_no_model_state():
    """The model layer is plain PyTorch: importing it registers no operator, and importing and
    running the kernels and the engine leaves every module-level name of lmstack.model as it was."""
    script = r'''
import importlib, pkgutil, torch
before = set(torch._C._dispatch_get_all_op_names())
import lmstack.model
mods = [importlib.import_module(f"lmstack.model.{m.name}") for m in pkgutil.iter_modules(lmstack.model.__path__)]
assert set(torch._C._dispatch_get_all_op_names()) == before, "lmstack.model registered ops"
def state():
    return {(mod.__name__, k): (id(v), repr(v)) for mod in mods for k, v in vars(mod).items()
            if not k.startswith("__")}
snapshot = state()
from lmstack.infer import LLM, SamplingParams
from lmstack.model import ModelConfig, Transformer
model = Transformer.build(ModelConfig.from_preset("tiny-llama"), seed=0)
LLM(model).generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))
changed = [k for k, v in state().items() if snapshot.get(k) != v]
assert not changed, changed
print("ok")
'''
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]

"""Fine-tuning: chat SFT data (assistant-only targets, packing), LoRA / QLoRA by module swap,
merging, PEFT interop both ways, the loop's LoRA checkpoints and exact resume, bad inputs, the
CLI, and a reduced run of the synthetic task (benchmarks/finetune_task.py)."""

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmstack.data.sft import (
    IGNORE_INDEX,
    SFTBatches,
    collate,
    fixed_batches,
    load_sft,
    pack,
    read_records,
    render,
)
from lmstack.finetune import (
    AbsmaxNF4Linear,
    LoRALinear,
    NF4Linear,
    apply_lora,
    base_weight_bytes,
    load_adapter,
    lora_state_dict,
    merge_lora,
    quantize_nf4,
    remove_lora,
    save_adapter,
    unmerge_lora,
    use_adapter,
)
from lmstack.kernels import CPU_PACKED, FUSED, swap_linears
from lmstack.model import ModelConfig, Transformer
from lmstack.model.hf import save_hf
from lmstack.model.tokenizer import Tokenizer
from lmstack.model.transformer import document_mask
from lmstack.train import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    train,
)
from lmstack.train.loop import cross_entropy_sum, token_cross_entropy_sum

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"{a}+{b}={a + b} hello world" for a in range(10, 60) for b in range(10, 30)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=300)


def tiny(tok, seed: int = 0, **overrides) -> Transformer:
    cfg = ModelConfig.from_preset("tiny-llama", vocab_size=tok.vocab_size, **overrides)
    model = Transformer.build(cfg, seed=seed)
    with torch.no_grad():  # norms away from 1 so that a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def randomize_lora_(model, seed: int = 1, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def tokens(tok, n: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, tok.vocab_size, (n, T), generator=torch.Generator().manual_seed(3))


def chat(a: int, b: int, turns: int = 1) -> dict:
    messages = [{"role": "system", "content": "add"}]
    for i in range(turns):
        messages += [{"role": "user", "content": f"{a + i}+{b}="},
                     {"role": "assistant", "content": str(a + i + b)}]
    return {"messages": messages}


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def quiet(**kw) -> TrainConfig:
    base = dict(batch_size=2, seq_len=96, max_steps=4, device="cpu",
                optim=OptimConfig(lr=1e-2, weight_decay=0.0),
                schedule=ScheduleConfig(kind="constant", warmup_steps=0),
                eval=EvalConfig(every=0), checkpoint=CheckpointConfig(every=0),
                logging=LoggingConfig(progress_bar=False, tensorboard=False, plot=False))
    return TrainConfig(**{**base, **kw})


def sft_batches(tok, tmp_path, n: int = 12, seq_len: int = 96, pack_rows: bool = True, seed=0):
    data = write_jsonl(tmp_path / "chat.jsonl", [chat(10 + i, 20 + i, turns=1 + (i % 3 == 2)) for i in range(n)])
    examples, _ = load_sft(data, tok, seq_len)
    return SFTBatches(examples, 2, seq_len, pack_rows=pack_rows, seed=seed), examples


# ----------------------------------------------------------------------------- LoRA

def test_zero_B_leaves_logits_unchanged_and_names_are_kept(tok):
    model = tiny(tok)
    x = tokens(tok)
    want = model(x)
    plain_keys = set(model.state_dict())
    names = apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    assert len(names) == 4 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert torch.equal(model(x), want)
    keys = set(model.state_dict())
    assert plain_keys <= keys  # the base weight keeps its name (q_proj.weight)
    assert keys - plain_keys == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [f"{n}.lora_{ab}" for n in names for ab in "AB"]


def test_state_dict_round_trips_through_the_hooks(tok):
    model = tiny(tok)
    apply_lora(model, "all-linear", r=2, alpha=4)
    randomize_lora_(model)
    other = tiny(tok, seed=5)
    apply_lora(other, "all-linear", r=2, alpha=4)
    other.load_state_dict(model.state_dict())
    x = tokens(tok)
    assert torch.equal(other(x), model(x))


def test_merged_equals_unmerged_and_remove_gives_a_plain_model(tok, tmp_path):
    model = tiny(tok)
    apply_lora(model, "all-linear", r=4, alpha=8, rslora=True)
    randomize_lora_(model)
    x = tokens(tok)
    adapted = model(x)
    base = tiny(tok)(x)
    assert (adapted - base).abs().max() > 1e-2
    merge_lora(model)
    assert (model(x) - adapted).abs().max() <= 1e-5
    unmerge_lora(model)
    assert (model(x) - adapted).abs().max() <= 1e-5
    remove_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (model(x) - adapted).abs().max() <= 1e-5
    save_hf(model, tmp_path / "hf")  # a plain Transformer again


def test_only_adapters_train_and_the_base_is_bitwise_unchanged(tok, tmp_path):
    model = tiny(tok)
    apply_lora(model, ["q_proj", "o_proj", "down_proj"], r=4, alpha=8, dropout=0.1)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    batches, _ = sft_batches(tok, tmp_path)
    grads = {}
    inputs, targets, positions, segments = batches.next_batch()
    cross_entropy_sum(model, inputs, targets, positions, segments).backward()
    for name, p in model.named_parameters():
        grads[name] = p.grad is not None
    assert all(v == ("lora_" in k) for k, v in grads.items())
    model.zero_grad()
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    train(model, batches, quiet())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(not torch.equal(before[k], v) for k, v in lora_state_dict(model).items()
               if k.endswith("lora_B"))


def test_lora_composes_with_the_kernels_seam(tok):
    model = tiny(tok)
    apply_lora(model, ["q_proj", "up_proj"], r=4, alpha=8)
    randomize_lora_(model)
    x = tokens(tok)
    with torch.no_grad():
        want = model(x)
        swap_linears(model, CPU_PACKED)  # the bases inside the wrappers are swapped too
        assert type(model.layers[0].self_attn.q_proj.base).__name__ == "PackedLinear"
        assert (model(x) - want).abs().max() <= 1e-5
    fused = tiny(tok)
    apply_lora(fused, ["q_proj", "up_proj"], r=4, alpha=8)
    randomize_lora_(fused)
    swap_linears(fused, FUSED)
    assert (fused(x) - want).abs().max() <= 1e-5


def test_lora_over_an_int8_kernels_base_trains_only_the_adapter(tok):
    from lmstack.compress import quantize_
    model = tiny(tok)
    quantize_(model, "int8", progress=False)
    x = tokens(tok)
    with torch.no_grad():
        want = model(x)
    apply_lora(model, ["q_proj", "down_proj"], r=4, alpha=8)
    assert type(model.layers[0].self_attn.q_proj.base).__name__ == "Int8Linear"
    with torch.no_grad():
        assert torch.equal(model(x), want)
    model(x).float().pow(2).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".lora_" in n for n in trained)


# ----------------------------------------------------------------------------- PEFT interop

def _hf_logits(hf, x):
    with torch.no_grad():
        return hf(x).logits


def peft_written_adapter(model, targets: list[str], tmp_path):
    """`model` exported to tmp_path/base, a peft LoRA (r 4) on `targets` with random A and B
    saved to tmp_path/adapter; returns (peft's wrapped HF model, tmp_path/adapter)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    save_hf(model, tmp_path / "base")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, lora_dropout=0.0,
                             task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(hf, config)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    wrapped.save_pretrained(tmp_path / "adapter")
    return wrapped, tmp_path / "adapter"


def test_our_adapter_loads_in_peft_with_the_same_logits(tok, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    model = tiny(tok)
    save_hf(model, tmp_path / "base")
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8)
    randomize_lora_(model)
    save_adapter(model, tmp_path / "adapter", base_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    x = tokens(tok)
    plain = _hf_logits(hf, x)
    wrapped = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    theirs = _hf_logits(wrapped, x)
    with torch.no_grad():
        ours = model(x)
    print(f"PEFT vs lmstack adapter: max |logits diff| = {(theirs - ours).abs().max():.2e}")
    assert (theirs - plain).abs().max() > 1e-2  # peft applied it (it ignores unknown keys)
    assert (theirs - ours).abs().max() <= 1e-4


def test_an_adapter_written_by_peft_loads_with_the_same_logits(tok, tmp_path):
    wrapped, _ = peft_written_adapter(tiny(tok), ["k_proj", "gate_proj"], tmp_path)
    x = tokens(tok)
    theirs = _hf_logits(wrapped.eval(), x)
    from lmstack.model import load_hf
    ours_model = load_hf(tmp_path / "base")
    names = load_adapter(ours_model, tmp_path / "adapter")
    assert len(names) == 4
    with torch.no_grad():
        ours = ours_model(x)
    print(f"lmstack vs PEFT-written adapter: max |logits diff| = {(theirs - ours).abs().max():.2e}")
    assert (theirs - ours).abs().max() <= 1e-4


def test_an_adapter_for_another_base_names_the_shape_mismatch(tok, tmp_path):
    model = tiny(tok)
    apply_lora(model, ["q_proj"], r=4, alpha=8)
    save_adapter(model, tmp_path / "adapter")
    wider = tiny(tok, dim=128, n_heads=4)
    with pytest.raises(ValueError, match=r"lora_A has shape \(4, 64\).*needs \(4, 128\).*different base"):
        load_adapter(wider, tmp_path / "adapter")


def tiny_gpt2(tok, seed: int = 0) -> Transformer:
    model = Transformer.build(ModelConfig.from_preset("tiny-gpt2", vocab_size=tok.vocab_size), seed=seed)
    with torch.no_grad():  # biases and norms away from their init so that a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("rslora", [False, True])
def test_our_gpt2_adapter_on_separate_qkv_loads_in_peft_as_c_attn(tok, tmp_path, rslora):
    """q and v adapted, k not: c_attn gets rank 2r (A_q; A_v) with a block-diagonal B whose k
    rows are zero; o_proj is adapted and mlp.c_proj is not, so target_modules are full paths."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    model = tiny_gpt2(tok)
    save_hf(model, tmp_path / "base")
    apply_lora(model, ["q_proj", "v_proj", "o_proj", "up_proj"], r=4, alpha=8, rslora=rslora)
    randomize_lora_(model)
    save_adapter(model, tmp_path / "adapter", base_name_or_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["fan_in_fan_out"]
    assert config["lora_alpha"] == pytest.approx(8 * (2 ** 0.5 if rslora else 2))
    assert "transformer.h.0.attn.c_proj" in config["target_modules"]
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    b = keys["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert b.shape == (3 * 64, 8) and not b[64:128].any()
    assert keys["base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"][4:].abs().sum() == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    x = tokens(tok)
    plain = _hf_logits(hf, x)
    theirs = _hf_logits(peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval(), x)
    with torch.no_grad():
        ours = model(x)
    print(f"PEFT vs lmstack GPT-2 adapter (rslora={rslora}): max |logits diff| = "
          f"{(theirs - ours).abs().max():.2e}")
    assert (theirs - plain).abs().max() > 1e-2
    assert (theirs - ours).abs().max() <= 1e-4
    again = tiny_gpt2(tok)  # and back: q, k, v of rank 2r each, the same logits
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        assert (again(x) - ours).abs().max() <= 1e-5


def test_a_peft_written_gpt2_c_attn_adapter_loads_with_the_same_logits(tok, tmp_path):
    from lmstack.model import load_hf
    wrapped, _ = peft_written_adapter(tiny_gpt2(tok), ["c_attn", "c_proj", "c_fc"], tmp_path)
    x = tokens(tok)
    theirs = _hf_logits(wrapped.eval(), x)
    ours_model = load_hf(tmp_path / "base")
    names = load_adapter(ours_model, tmp_path / "adapter")
    assert len(names) == 2 * 6  # q, k, v (from c_attn), o, up, down per block
    with torch.no_grad():
        ours = ours_model(x)
        plain = load_hf(tmp_path / "base")(x)
    print(f"lmstack vs PEFT-written GPT-2 adapter: max |logits diff| = {(theirs - ours).abs().max():.2e}")
    assert (ours - plain).abs().max() > 1e-2
    assert (theirs - ours).abs().max() <= 1e-4


# ----------------------------------------------------------------------------- SFT data

def test_two_turn_conversation_targets_exactly_the_assistant_tokens(tok):
    messages = chat(12, 30, turns=2)["messages"]
    ids, is_target = render(tok, messages)
    assistant = []  # by hand: each assistant turn is its content and the end of turn
    for answer in ("42", "43"):
        assistant += tok.encode(f"{answer}<|im_end|>\n")
    assert [t for t, keep in zip(ids, is_target, strict=True) if keep] == assistant
    assert tok.decode(ids) == tok.apply_chat_template(messages)
    inputs, targets = collate([[_example(ids, is_target)]], seq_len=len(ids) - 1, packed=False)
    assert targets[targets != IGNORE_INDEX].tolist() == assistant
    model = tiny(tok)
    logits = model(inputs)
    keep = targets[0] != IGNORE_INDEX
    by_hand = torch.nn.functional.cross_entropy(logits[0, keep], targets[0, keep], reduction="sum")
    assert torch.allclose(cross_entropy_sum(model, inputs, targets), by_hand)


def _example(ids, is_target):
    from lmstack.data.sft import to_example
    return to_example(ids, is_target)


def test_packed_and_unpacked_batches_give_the_same_per_conversation_losses(tok, tmp_path):
    _, examples = sft_batches(tok, tmp_path, n=6)
    model = tiny(tok)
    rows = pack(examples, 96)
    assert any(len(r) > 1 for r in rows)
    inputs, targets, positions, segments = collate(rows, 96)
    logits = model(inputs, positions=positions, segment_ids=segments)
    packed = []
    for b, row in enumerate(rows):
        start = 0
        for ex in row:
            n = len(ex.inputs)
            packed.append(token_cross_entropy_sum(logits[b:b + 1, start:start + n],
                                                  targets[b:b + 1, start:start + n]))
            start += n
    alone = []
    for ex in examples:
        x, y = collate([[ex]], 96, packed=False)
        alone.append(cross_entropy_sum(model, x, y))
    assert len(packed) == len(alone) == len(examples)
    assert (torch.stack(packed) - torch.stack(alone)).abs().max() <= 1e-5


def test_no_token_attends_across_a_conversation_boundary(tok, tmp_path):
    _, examples = sft_batches(tok, tmp_path, n=3)
    rows = pack(examples, 96)
    inputs, _, positions, segments = collate(rows[:1], 96)
    assert segments[0].unique().numel() >= 3  # two conversations and padding
    first = segments[0] == 0
    model = tiny(tok)
    want = model(inputs, positions=positions, segment_ids=segments)
    changed = inputs.clone()
    changed[0, first] = (changed[0, first] + 7) % tok.vocab_size
    got = model(changed, positions=positions, segment_ids=segments)
    assert torch.equal(got[0, ~first], want[0, ~first])  # the others never saw the first one
    assert not torch.equal(got[0, first], want[0, first])
    mask = document_mask(segments)[0, 0]
    assert not (mask & (segments[0][:, None] != segments[0][None, :])).any()


def test_malformed_records_are_skipped_and_counted_with_file_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [
        chat(10, 20), "{not json",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "no answer"}]}, chat(11, 21)])
    examples, stats = load_sft(path, tok, seq_len=64)
    assert (len(examples), stats.records, len(stats.skipped)) == (2, 5, 3)
    summary = stats.summary()
    assert f"{path}:2:" in summary and "unknown role 'robot'" in summary
    assert f"{path}:4: no assistant turn" in summary
    with pytest.raises(ValueError, match=r"chat.jsonl:2: .*strict"):
        read_records(path, strict=True)


def test_long_conversations_are_truncated_by_the_documented_rule(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(10, 20, turns=6), chat(10, 20)])
    full, _ = load_sft(path, tok, seq_len=256)
    short, stats = load_sft(path, tok, seq_len=48)
    assert stats.truncated == 1 and stats.dropped == 0
    assert short[0].inputs == full[0].inputs[:48]  # the first seq_len + 1 tokens are kept
    _, stats = load_sft(path, tok, seq_len=8)  # no assistant token within 9 tokens
    assert stats.dropped == 2 and stats.kept == 0


def test_a_tokenizer_without_a_chat_template_says_how_to_add_one(tok, tmp_path):
    bare = Tokenizer(tok.backend, eos_token="<|endoftext|>")
    path = write_jsonl(tmp_path / "chat.jsonl", [chat(10, 20)])
    with pytest.raises(ValueError, match="no chat template.*chat_template.jinja"):
        load_sft(path, bare, 64)


# ----------------------------------------------------------------------------- loop

def test_lora_checkpoints_hold_adapters_only_and_resume_bitwise(tok, tmp_path):
    def run(steps, out, resume=None):
        torch.manual_seed(0)
        model = tiny(tok)
        apply_lora(model, "all-linear", r=4, alpha=8, dropout=0.1)
        batches, _ = sft_batches(tok, tmp_path)
        result = train(model, batches, quiet(max_steps=steps), out_dir=out, resume_from=resume,
                       base={"path": "tiny", "method": "lora"})
        return model, result

    straight, _ = run(6, tmp_path / "a")
    _, first = run(3, tmp_path / "b")
    saved = load_file(first.checkpoint / "model.safetensors")
    assert set(saved) == set(lora_state_dict(straight))
    state = json.loads((first.checkpoint / "trainer_state.json").read_text())
    assert state["weights"] == "trainable" and state["base"]["path"] == "tiny"
    resumed, _ = run(6, tmp_path / "b", resume=first.checkpoint)
    for k, v in lora_state_dict(straight).items():
        assert torch.equal(v, lora_state_dict(resumed)[k]), k


def test_validation_counts_assistant_tokens_only(tok, tmp_path):
    from lmstack.train import evaluate
    _, examples = sft_batches(tok, tmp_path)
    val = fixed_batches(examples, 2, 96)
    model = tiny(tok)
    total = sum(cross_entropy_sum(model, *b).item() for b in val)
    count = sum(int((b[1] != IGNORE_INDEX).sum()) for b in val)
    assistant = sum(sum(t != IGNORE_INDEX for t in ex.targets) for ex in examples)
    assert count == assistant
    assert evaluate(model, val) == pytest.approx(total / count, rel=1e-5)


# ----------------------------------------------------------------------------- bad input

def test_bad_lora_settings_are_refused(tok):
    with pytest.raises(ValueError, match=r"match no linear.*q_proj"):
        apply_lora(tiny(tok), ["qkv"], r=4, alpha=8)
    with pytest.raises(ValueError, match=r"r=0 .*>= 1"):
        apply_lora(tiny(tok), ["q_proj"], r=0, alpha=8)


def test_qlora_without_an_nf4_kernel_names_the_fix(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ValueError, match=r"--method qlora needs an NF4 kernel.*pip install"):
        quantize_nf4(tiny(tok))


# ----------------------------------------------------------------------------- QLoRA

def test_qlora_trains_over_nf4_and_merges_into_the_dequantized_weight(tok, tmp_path):
    pytest.importorskip("torchao")
    model = tiny(tok)
    apply_lora(model, "all-linear", r=4, alpha=8)
    assert quantize_nf4(model) == 15  # 14 adapted bases and the head
    nf4, bf16 = base_weight_bytes(model)
    assert nf4 <= 0.3 * bf16
    batches, _ = sft_batches(tok, tmp_path)
    train(model, batches, quiet())
    q = model.layers[0].self_attn.q_proj
    dequantized = q.base.dequantize().float()
    x = tokens(tok)
    with torch.no_grad():
        adapted = model(x)
    expect = dequantized + q.delta()
    merge_lora(model)
    assert torch.equal(q.base.weight, expect)  # into the dequantized NF4 weight
    remove_lora(model)
    with torch.no_grad():
        merged = model(x)
    assert (merged - adapted).abs().max() <= 0.05 * adapted.abs().max()  # bf16 vs fp32 products
    save_hf(model, tmp_path / "hf")
    from lmstack.model import load_hf
    assert torch.equal(load_hf(tmp_path / "hf").layers[0].self_attn.q_proj.weight, expect)


def test_exact_scales_are_no_worse_than_double_quantized_ones_and_both_are_4_bit(tok):
    pytest.importorskip("torchao")
    linear = torch.nn.Linear(256, 512)
    errors, ratios = {}, {}
    for double_quant in (True, False):
        nf4 = NF4Linear.from_linear(linear, double_quant=double_quant)
        errors[double_quant] = (nf4.dequantize().float() - linear.weight).abs().mean().item()
        model = tiny(tok)
        quantize_nf4(model, double_quant=double_quant)
        nbytes, bf16 = base_weight_bytes(model)
        ratios[double_quant] = nbytes / bf16
    print(f"NF4 mean |error| double_quant on {errors[True]:.4e}, off {errors[False]:.4e}; "
          f"bytes / bf16 on {ratios[True]:.4f}, off {ratios[False]:.4f}")
    assert errors[False] <= errors[True] < 0.2 * linear.weight.abs().mean().item()
    assert ratios[True] < ratios[False] <= 0.3
    exact = NF4Linear.from_linear(linear, double_quant=False)
    blocks = linear.weight.detach().to(torch.bfloat16).view(512, 4, 64)
    assert torch.equal(exact.absmax, blocks.abs().amax(-1))  # the scales are kept exactly
    assert exact.qweight.dtype == torch.uint8 and exact.qweight.shape == (512, 128)


@pytest.mark.parametrize("native_bf16", [True, False])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_products_multiply_in_fp32_on_a_cpu_without_native_bf16(native_bf16, double_quant,
                                                                    monkeypatch):
    """Same dequantized bf16 weight either way; only the dtype of the product changes."""
    pytest.importorskip("torchao")
    from lmstack.finetune import qlora
    monkeypatch.setattr(qlora, "NATIVE_CPU_BF16", native_bf16)
    dtype = torch.bfloat16 if native_bf16 else torch.float32
    assert qlora.compute_dtype(torch.device("cpu")) == dtype
    torch.manual_seed(0)
    nf4 = NF4Linear.from_linear(torch.nn.Linear(128, 64), double_quant=double_quant)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = nf4(x)
    weight = nf4.dequantize()
    assert weight.dtype == torch.bfloat16 and y.dtype == x.dtype
    expect = torch.nn.functional.linear(x.detach().to(dtype), weight.to(dtype)) + nf4.bias.to(dtype)
    assert torch.equal(y.detach(), expect.float())
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, (grad.to(dtype) @ weight.to(dtype)).float())


def test_qlora_over_exact_scales_trains_merges_and_reloads(tok, tmp_path):
    pytest.importorskip("torchao")
    model = tiny(tok)
    apply_lora(model, "all-linear", r=4, alpha=8)
    assert quantize_nf4(model, double_quant=False) == 15
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q.base, AbsmaxNF4Linear)
    codes = q.base.qweight.clone()
    batches, _ = sft_batches(tok, tmp_path)
    result = train(model, batches, quiet(max_steps=6))
    print("losses over exact-scale NF4:", [round(v, 3) for v in result.losses])
    assert result.losses[-1] < result.losses[0]
    assert torch.equal(q.base.qweight, codes)  # the base takes no step
    save_adapter(model, tmp_path / "adapter", quantized_base="nf4", double_quant=False)
    x = tokens(tok)
    with torch.no_grad():
        adapted = model(x)
    expect = q.base.dequantize().float() + q.delta()
    remove_lora(model)
    assert torch.equal(q.base.weight, expect)  # into the dequantized weight
    with torch.no_grad():
        merged = model(x)
    # the adapted model's base products take bf16 inputs and round to bf16 (8 bits of mantissa,
    # relative 2^-9 per rounding, some tens of them along 2 blocks); the merged one is fp32
    print(f"merged vs adapted over exact-scale NF4: {(merged - adapted).abs().max():.2e} "
          f"of max |logit| {adapted.abs().max():.2f}")
    assert (merged - adapted).abs().max() <= 0.05 * adapted.abs().max()
    assert json.loads((tmp_path / "adapter" / "lmstack_adapter.json").read_text()) == \
        {"quantized_base": "nf4", "double_quant": False}
    reloaded = use_adapter(tiny(tok), tmp_path / "adapter")  # quantized the same way, then merged
    assert torch.equal(reloaded.layers[0].self_attn.q_proj.weight, expect)


@pytest.mark.parametrize("double_quant", [True, False])
def test_a_qlora_model_deep_copies_exactly(tok, double_quant):
    pytest.importorskip("torchao")
    model = tiny(tok)
    apply_lora(model, ["q_proj", "down_proj"], r=4, alpha=8)
    quantize_nf4(model, double_quant=double_quant)
    randomize_lora_(model)
    twin = copy.deepcopy(model)
    x = tokens(tok)
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
    ours, theirs = model.layers[0].mlp.up_proj, twin.layers[0].mlp.up_proj
    assert type(theirs) is type(ours)
    assert not {id(p) for p in theirs.parameters()} & {id(p) for p in ours.parameters()}
    assert torch.equal(theirs.dequantize(), ours.dequantize())  # not quantized a second time
    with torch.no_grad():
        twin.layers[0].self_attn.q_proj.lora_B.zero_()
        assert not torch.equal(twin(x), model(x))


# ----------------------------------------------------------------------------- end to end

def _task():
    spec = importlib.util.spec_from_file_location("finetune_task", ROOT / "benchmarks" / "finetune_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli_base(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_hf(tiny(tok), root / "base")
    tok.save(root / "base")
    write_jsonl(root / "chat.jsonl", [chat(10 + i, 20 + i) for i in range(16)] + ['{"bad": 1}'])
    write_jsonl(root / "val.jsonl", [chat(40 + i, 11) for i in range(4)])
    return root


def finetune_flags(root, out, *extra):
    return ["finetune", "--base", str(root / "base"), "--data", str(root / "chat.jsonl"),
            "--val-data", str(root / "val.jsonl"), "--out", str(out), "--lora.r", "4",
            "--train.max-steps", "3", "--train.batch-size", "2", "--train.seq-len", "96",
            "--train.device", "cpu", "--train.logging.progress-bar", "false",
            "--train.logging.tensorboard", "false", "--train.logging.plot", "false", *extra]


def test_finetune_merge_lora_and_sample_adapter_commands(cli_base, tmp_path, capsys):
    from lmstack.cli import main
    from lmstack.model import load_hf
    out = tmp_path / "run"
    assert main(finetune_flags(cli_base, out)) == 0
    printed = capsys.readouterr().out
    assert "chat.jsonl:17:" in printed and "1 malformed" in printed and "val loss" in printed
    ckpt = out / "checkpoints" / "step_00000003"
    assert all("lora_" in k for k in load_file(ckpt / "model.safetensors"))
    assert main(["merge-lora", str(cli_base / "base"), str(out / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    x = tokens(tok=Tokenizer.load(cli_base / "base"))
    with torch.no_grad():
        merged, exported = load_hf(tmp_path / "merged")(x), load_hf(out / "hf")(x)
        base = load_hf(cli_base / "base")(x)
    assert (merged - exported).abs().max() <= 1e-5 and (merged - base).abs().max() > 0
    capsys.readouterr()
    sample = ["sample", str(cli_base / "base"), "--prompt", "12+", "--temperature", "0",
              "--max-new-tokens", "5", "--device", "cpu"]
    assert main([*sample, "--adapter", str(out / "adapter")]) == 0
    with_adapter = capsys.readouterr().out
    sample[1] = str(tmp_path / "merged")
    assert main(sample) == 0
    assert capsys.readouterr().out == with_adapter
    engine = ["generate", str(tmp_path / "merged"), "--prompt", "12+", "--temperature", "0",
              "--max-new-tokens", "5", "--device", "cpu"]
    assert main(engine) == 0
    merged_text = capsys.readouterr().out
    engine[1] = str(cli_base / "base")
    assert main([*engine, "--adapter", str(out / "adapter")]) == 0
    assert capsys.readouterr().out == merged_text
    assert main(finetune_flags(cli_base, out, "--resume", "--lora.r", "8")) == 2
    assert "resume with the --base, --method and --lora settings" in capsys.readouterr().err


def test_finetune_command_double_quant_flag_reaches_the_model(cli_base, tmp_path):
    pytest.importorskip("torchao")
    from lmstack.cli import main
    from lmstack.cli.finetune import adapt, parse_args
    from lmstack.model import load_hf
    args = parse_args(finetune_flags(cli_base, tmp_path / "q")[1:] + ["--lora.double-quant", "false"])
    assert args.lora.double_quant is False
    model = load_hf(cli_base / "base")
    adapt(model, "qlora", args.lora)
    assert isinstance(model.layers[0].self_attn.q_proj.base, AbsmaxNF4Linear)
    out = tmp_path / "q"
    assert main(finetune_flags(cli_base, out, "--method", "qlora", "--train.max-steps", "1",
                               "--lora.double-quant", "false")) == 0
    assert json.loads((out / "adapter" / "lmstack_adapter.json").read_text())["double_quant"] is False
    assert main(["merge-lora", str(cli_base / "base"), str(out / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    exported, merged = load_file(out / "hf" / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert all(torch.equal(exported[k], merged[k]) for k in exported)  # merged over exact scales both times


def test_finetune_command_qlora_and_bad_flags(cli_base, tmp_path, capsys):
    pytest.importorskip("torchao")
    from lmstack.cli import main
    out = tmp_path / "q"
    assert main(finetune_flags(cli_base, out, "--method", "qlora", "--train.max-steps", "2")) == 0
    assert json.loads((out / "adapter" / "lmstack_adapter.json").read_text())["quantized_base"] == "nf4"
    full = tmp_path / "full"
    assert main(finetune_flags(cli_base, full, "--method", "full", "--train.max-steps", "2",
                               "--train.precision.dtype", "bf16")) == 0
    assert (full / "hf" / "model.safetensors").is_file() and not (full / "adapter").exists()
    saved = load_file(full / "checkpoints" / "step_00000002" / "model.safetensors")
    assert "layers.0.self_attn.q_proj.weight" in saved  # full fine-tuning keeps every weight
    assert main(finetune_flags(cli_base, tmp_path / "r0", "--lora.r", "0")) == 2
    assert "--lora.r=0 is invalid" in capsys.readouterr().err
    assert main(finetune_flags(cli_base, tmp_path / "t", "--lora.targets", "qkv")) == 2
    assert "match no linear" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_sft_learns_the_synthetic_chat_task(tmp_path):
    """A reduced benchmarks/finetune_task.py: a tiny base, fixed step counts, a lower bar."""
    task = _task()
    args = task.parse_args(["--preset", "tiny-llama", "--methods", "lora", "qlora", "--high", "9",
                            "--pretrain-steps", "300", "--max-steps", "150", "--n-test", "40",
                            "--lr", "1e-2", "--out", str(tmp_path)])
    args.pretrain_s = args.max_time_s = None
    rows = {r["method"]: r for r in task.run(args)}
    print(rows)
    for method, row in rows.items():
        assert row["before"] <= 0.1, method
        assert row["after"] >= 0.5, method
    assert rows["qlora"]["base_bytes_ratio"] <= 0.3

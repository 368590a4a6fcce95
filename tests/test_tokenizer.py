"""Tokenizer: exact round-trips, parity with transformers (encode, decode, chat), bad input."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmstack.model.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer

SAMPLES = [
    "",
    "Hello, world! It's 2024; don't panic.",
    "Crème brûlée, naïve façade, Ångström, Øresund",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇳🇿",
    "שלום עולם - مرحبا بالعالم (RTL)",
    "def f(x):\n\tif x:\n\t\treturn  x  # two spaces\n    else:\n        pass\n",
    "   \n\n\n  \t \r\n\t\t   ",
    "  leading and trailing  ",
    "a <|im_end|> b<|endoftext|>c <|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|><|endoftext|>",
    "space before . , ! ? and do n't , I 'm ; ca n't",
    "numbers 1234567890 3.14159 -42 0x1F",
    "zero\u200bwidth\u00a0nbsp and \x00 nul \x7f del",
]

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "  And 日本 + 😀? \n"},
]

# Llama-2 style: bos_token per user turn, system folded into the first one, alternation enforced
# with raise_exception, tools shown with tojson. Multi-line to exercise trim/lstrip_blocks.
INST_TEMPLATE = """\
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set turns = messages[1:] %}
{% else %}
    {% set system = none %}
    {% set turns = messages %}
{% endif %}
{% for message in turns %}
    {% if (message['role'] == 'user') != (loop.index0 is even) %}
        {{ raise_exception('roles must alternate user/assistant, got ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'user' %}
{{ bos_token }}[INST] {% if loop.first and system %}<<SYS>>
{{ system }}
{% if tools %}
Tools: {{ tools | tojson(indent=2) }}
{% endif %}
<</SYS>>

{% endif %}
{{ message['content'] | trim }} [/INST]
    {%- else %}
 {{ message['content'] | trim }} {{ eos_token }}
    {%- endif %}
{% endfor %}
"""

TOOLS = [{"name": "add", "description": "Add <two> numbers & return", "parameters": {"a": "int"}}]


def _stdlib_texts(min_bytes: int, skip: int = 0) -> list[str]:
    """Python stdlib sources, sorted by name, until `min_bytes` are collected."""
    root = Path(os.path.dirname(os.__file__))
    texts, total = [], 0
    for path in sorted(root.glob("*.py"))[skip:]:
        texts.append(path.read_text(encoding="utf-8"))
        total += len(texts[-1].encode())
        if total >= min_bytes:
            break
    return texts


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(_stdlib_texts(300_000), vocab_size=1000)


@pytest.fixture(scope="module")
def inst_tok() -> Tokenizer:
    return Tokenizer.train(
        _stdlib_texts(50_000),
        vocab_size=400,
        special_tokens=("<s>", "</s>"),
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        chat_template=INST_TEMPLATE,
    )


def _hf(tokenizer: Tokenizer, directory: Path):
    transformers = pytest.importorskip("transformers")
    tokenizer.save(directory)
    return transformers.AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    return _hf(tok, tmp_path_factory.mktemp("chatml"))


@pytest.fixture(scope="module")
def hf_inst_tok(inst_tok, tmp_path_factory):
    return _hf(inst_tok, tmp_path_factory.mktemp("inst"))


# ---- training and round-trips ----------------------------------------------------------------


def test_trained_vocab_has_bytes_specials_and_merges(tok):
    assert tok.vocab_size == len(tok) == 1000
    from tokenizers.pre_tokenizers import ByteLevel

    assert all(tok.token_to_id(symbol) is not None for symbol in ByteLevel.alphabet())
    assert tok.eos_id == tok.pad_id == tok.token_to_id("<|endoftext|>")
    assert tok.bos_id is None
    assert tok.token_to_id("<|im_start|>") is not None and tok.token_to_id("no such token") is None
    held_out = "".join(_stdlib_texts(20_000, skip=120))
    assert (
        len(held_out.encode()) / len(tok.encode(held_out)) > 2.0
    )  # merges learned, not just bytes


@pytest.mark.parametrize("text", SAMPLES)
def test_roundtrip_exact(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(), st.sampled_from(["<|im_end|>", "<|endoftext|>", "\n\t  "]))))
def test_roundtrip_any_string(tok, pieces):
    text = "".join(pieces)
    assert tok.decode(tok.encode(text)) == text


def test_special_token_strings_are_single_ids(tok):
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    ids = tok.encode("a<|im_end|>b<|endoftext|>")
    assert ids.count(im_end) == 1 and ids.count(eot) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_add_bos_eos(tok, inst_tok):
    assert tok.encode("hi", add_eos=True) == tok.encode("hi") + [tok.eos_id]
    with pytest.raises(ValueError, match="bos_token"):
        tok.encode("hi", add_bos=True)
    ids = inst_tok.encode("hi", add_bos=True, add_eos=True)
    assert (
        ids[0] == inst_tok.bos_id
        and ids[-1] == inst_tok.eos_id
        and ids[1:-1] == inst_tok.encode("hi")
    )


def test_encode_batch_equals_encode(tok):
    texts = SAMPLES + _stdlib_texts(30_000, skip=80)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_eos=True) == [tok.encode(t, add_eos=True) for t in texts]


def test_train_from_files_equals_train_on_their_lines(tmp_path):
    root = Path(os.path.dirname(os.__file__))
    files = sorted(root.glob("*.py"))[:5]
    lines = [
        line for f in files for line in f.read_text(encoding="utf-8").splitlines(keepends=True)
    ]
    from_files = Tokenizer.train_from_files(files, vocab_size=400)
    assert from_files.fingerprint() == Tokenizer.train(lines, vocab_size=400).fingerprint()


# ---- files and fingerprint ----------------------------------------------------------------------


def test_save_load_identical(tok, tmp_path):
    tok.save(tmp_path)
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        loaded = Tokenizer.load(path)
        assert loaded.fingerprint() == tok.fingerprint()
        assert loaded.special_tokens_map == tok.special_tokens_map
        assert loaded.chat_template == tok.chat_template == DEFAULT_CHAT_TEMPLATE
        assert loaded.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)


def test_pickles_after_rendering_a_template(tok):
    tok.apply_chat_template(CONVERSATION)  # caches a compiled jinja template
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.fingerprint() == tok.fingerprint()
    assert clone.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)


def test_loads_a_dir_saved_by_transformers(tok, hf_tok, tmp_path):
    hf_tok.save_pretrained(tmp_path)  # transformers 5 writes chat_template.jinja, its own config
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
    assert loaded.special_tokens_map == tok.special_tokens_map
    assert loaded.chat_template == tok.chat_template


def test_fingerprint_tells_tokenizers_apart(tok):
    other = Tokenizer.train(_stdlib_texts(300_000), vocab_size=999)
    assert other.fingerprint() != tok.fingerprint()
    assert len(tok.fingerprint()) == 64


def test_load_reads_chat_template_jinja_and_added_token_dicts(tok, tmp_path):
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = {"__type": "AddedToken", "content": "<|im_end|>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(INST_TEMPLATE)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.eos_id == tok.token_to_id("<|im_end|>")
    assert loaded.chat_template == INST_TEMPLATE
    tok.save(tmp_path)  # a fresh save must not leave the stale template in charge
    assert Tokenizer.load(tmp_path).chat_template == DEFAULT_CHAT_TEMPLATE


# ---- parity with transformers -------------------------------------------------------------------


@pytest.mark.parametrize("text", SAMPLES)
def test_transformers_encodes_and_decodes_identically(tok, hf_tok, text):
    ids = tok.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok.decode(ids) == tok.decode(ids) == text
    assert hf_tok.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)


def test_transformers_sees_the_same_special_tokens(tok, hf_tok):
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.pad_token_id == tok.pad_id
    assert hf_tok.bos_token is None and len(hf_tok) == tok.vocab_size


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chatml_template_matches_transformers(tok, hf_tok, add_generation_prompt):
    text = tok.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt)
    expected = hf_tok.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert text == expected
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ids = tok.apply_chat_template(
        CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    assert ids == hf_tok.apply_chat_template(
        CONVERSATION, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    assert ids.count(tok.token_to_id("<|im_start|>")) == len(CONVERSATION) + add_generation_prompt


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_second_template_matches_transformers(inst_tok, hf_inst_tok, tools):
    text = inst_tok.apply_chat_template(CONVERSATION, tools=tools)
    assert text == hf_inst_tok.apply_chat_template(CONVERSATION, tools=tools, tokenize=False)
    assert text.startswith("<s>[INST] <<SYS>>\nYou are terse.\n")
    assert text.count("<s>[INST]") == 2 and " 4. </s>" in text
    assert ('"description": "Add <two> numbers & return"' in text) == (tools is not None)


def test_template_raise_exception(inst_tok, hf_inst_tok):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="roles must alternate"):
        inst_tok.apply_chat_template(bad)
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        hf_inst_tok.apply_chat_template(bad, tokenize=False)


def test_chat_template_override_and_extra_variables(tok, hf_tok):
    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}"
        "{% endfor %}{{ ns.n }} before first reply; {{ greeting }}"
        "{{ eos_token }} {{ tools is none }}"
    )
    text = tok.apply_chat_template(CONVERSATION, chat_template=template, greeting="hey")
    assert text == "2 before first reply; hey<|endoftext|> True"
    assert text == hf_tok.apply_chat_template(
        CONVERSATION, chat_template=template, tokenize=False, greeting="hey"
    )


# ---- bad input ----------------------------------------------------------------------------------


def test_vocab_too_small():
    with pytest.raises(ValueError, match=r"vocab_size=100 .*at least 260"):
        Tokenizer.train(["abc"], vocab_size=100)


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)  # exists, but empty
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        Tokenizer.train_from_files([tmp_path / "nope.txt"], vocab_size=400)


@pytest.mark.parametrize("content", ['{"model": {"type": "BPE", "vocab": ', '{"model": 3}'])
def test_corrupt_tokenizer_json(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def test_corrupt_tokenizer_config(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.load(tmp_path)


def test_missing_chat_template(tmp_path):
    bare = Tokenizer.train(_stdlib_texts(20_000), vocab_size=400, chat_template=None)
    with pytest.raises(ValueError, match="no chat template.*chat_template="):
        bare.apply_chat_template(CONVERSATION)
    with pytest.raises(ValueError, match="not valid jinja"):
        bare.apply_chat_template(CONVERSATION, chat_template="{% for %}")


def test_bad_ids_and_tokens(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(ValueError, match="bos_token='<s>' is not in the vocabulary"):
        Tokenizer(tok.backend, bos_token="<s>")

"""Tokenizer: byte-level BPE from HF `tokenizers`, saved in Hugging Face format, chat templates.

The Rust `tokenizers` library trains, encodes and decodes. This file adds what lmstack needs around
it: named special tokens (bos / eos / pad / unk), a directory that `transformers.AutoTokenizer`
loads and encodes identically (tokenizer.json + tokenizer_config.json + special_tokens_map.json),
jinja chat templates rendered the way transformers renders them, and a fingerprint that token
shards record in their meta.json to say which tokenizer made them.

Byte-level means every string round-trips exactly: the 256 byte symbols are all in the vocabulary,
and there is no normalizer, so `decode(encode(s)) == s` for any `s`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2
    import tokenizers

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# ChatML: <|im_start|>{role}\n{content}<|im_end|>\n per message; the generation prompt opens an
# assistant turn. The `\n` are jinja escapes, so the saved JSON reads like the templates on the Hub.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The special tokens transformers names (and passes to chat templates as variables).
NAMED_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
_NUM_BYTES = 256


class Tokenizer:
    """A trained byte-level BPE tokenizer, its named special tokens and optional chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
    ) -> None:
        self.backend = backend
        named = {
            "bos_token": bos_token,
            "eos_token": eos_token,
            "pad_token": pad_token,
            "unk_token": unk_token,
        }
        # Same shape as transformers' `special_tokens_map`: only the tokens that are set.
        self.special_tokens_map = {name: tok for name, tok in named.items() if tok is not None}
        for name, tok in self.special_tokens_map.items():
            if backend.token_to_id(tok) is None:
                raise ValueError(
                    f"{name}={tok!r} is not in the vocabulary; pass one of its special tokens"
                )
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self._compiled: dict[str, jinja2.Template] = {}

    def __getstate__(self) -> dict:
        # Compiled templates do not pickle; drop them so the tokenizer can go to worker processes.
        return {**self.__dict__, "_compiled": {}}

    # ---- training -------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        min_frequency: int = 2,
        chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
        *,
        bos_token: str | None = None,
        eos_token: str | None = "<|endoftext|>",
        pad_token: str | None = "<|endoftext|>",
        model_max_length: int | None = None,
    ) -> Tokenizer:
        """Learn BPE merges from `texts`; named tokens missing from `special_tokens` are added.

        The result may hold fewer than `vocab_size` tokens when the corpus runs out of pairs seen
        `min_frequency` times.
        """
        named = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        specials = list(
            dict.fromkeys([*special_tokens, *(t for t in named.values() if t is not None)])
        )
        backend, trainer = _untrained_bpe(vocab_size, specials, min_frequency)
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend, chat_template=chat_template, model_max_length=model_max_length, **named)

    @classmethod
    def train_from_files(cls, paths: Iterable[str | Path], vocab_size: int, **kw: Any) -> Tokenizer:
        """`train` on UTF-8 text files, read line by line; `kw` are `train`'s keyword arguments."""
        files = [Path(p) for p in paths]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"training files not found: {missing}; pass existing text files"
            )
        if not files:
            raise ValueError("train_from_files got no paths; pass at least one text file")
        return cls.train(_read_lines(files), vocab_size, **kw)

    # ---- files ----------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer dir or a tokenizer.json path (its dir's config is read)."""
        path = Path(path)
        json_path = path / "tokenizer.json" if path.is_dir() else path
        if not json_path.is_file():
            raise FileNotFoundError(
                f"no tokenizer at {str(path)!r}: looked for {str(json_path)!r}; pass a directory "
                "holding tokenizer.json (as written by Tokenizer.save) or the tokenizer.json itself"
            )
        backend = _backend_from_json(json_path)
        config = _read_json(json_path.parent / "tokenizer_config.json") or {}
        named = {name: _token_content(config.get(name)) for name in NAMED_TOKENS}
        template = _read_chat_template(json_path.parent, config)
        return cls(
            backend,
            chat_template=template,
            model_max_length=config.get("model_max_length"),
            **named,
        )

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path`."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_tokens_map,
            # transformers 4.x would "clean up" spaces before punctuation, breaking round-trips.
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        _write_json(out / "tokenizer_config.json", config)
        _write_json(out / "special_tokens_map.json", self.special_tokens_map)
        # A chat_template.jinja left from an earlier save would override the config's template.
        (out / "chat_template.jinja").unlink(missing_ok=True)

    def fingerprint(self) -> str:
        """sha256 of the canonical tokenizer.json: same fingerprint, same ids for any text."""
        canonical = json.dumps(
            json.loads(self.backend.to_str()),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    # ---- encode / decode ------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in `text` become their single special ids."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """`encode` for many texts at once, in parallel threads inside `tokenizers`."""
        encodings = self.backend.encode_batch_fast(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (any int sequence: list, numpy array, 1-D tensor)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})"
            )
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        head = [self._required_id("bos_token", "add_bos")] if add_bos else []
        tail = [self._required_id("eos_token", "add_eos")] if add_eos else []
        return head + ids + tail

    def _required_id(self, name: str, flag: str) -> int:
        token_id = self._named_id(name)
        if token_id is None:
            raise ValueError(
                f"{flag}=True but this tokenizer has no {name}; pass {name}= to Tokenizer.train"
            )
        return token_id

    # ---- vocabulary -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added special tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def _named_id(self, name: str) -> int | None:
        token = self.special_tokens_map.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._named_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._named_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._named_id("pad_token")

    # ---- chat -----------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        **extra: Any,
    ) -> str | list[int]:
        """Render `messages` with the chat template like transformers; `extra` are jinja variables.

        `chat_template` overrides the tokenizer's own for this call.
        """
        import jinja2

        if not messages:
            raise ValueError(
                "apply_chat_template got no messages; pass at least one {'role', 'content'} dict"
            )
        template = self._compile(self.chat_template if chat_template is None else chat_template)
        # Like transformers: None-valued keys are dropped, tools/documents default to None.
        chat = [{k: v for k, v in message.items() if v is not None} for message in messages]
        variables = {"tools": None, "documents": None, **self.special_tokens_map, **extra}
        try:
            text = template.render(
                messages=chat, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template rejected the conversation: {e}") from e
        return self.encode(text) if tokenize else text

    def _compile(self, source: str | None) -> jinja2.Template:
        if source is None:
            raise ValueError(
                "this tokenizer has no chat template; pass chat_template= to Tokenizer.train or "
                "to apply_chat_template, set tokenizer.chat_template, or add chat_template.jinja "
                "to its dir"
            )
        if source not in self._compiled:
            self._compiled[source] = _compile_template(source)
        return self._compiled[source]


# ---- helpers ------------------------------------------------------------------------------------


def _untrained_bpe(
    vocab_size: int, specials: list[str], min_frequency: int
) -> tuple[tokenizers.Tokenizer, tokenizers.trainers.BpeTrainer]:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    minimum = _NUM_BYTES + len(specials) + 1
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE with {len(specials)} special "
            f"tokens needs at least {minimum} (256 bytes + specials + 1 merge); "
            f"pass vocab_size >= {minimum}"
        )
    backend = Backend(models.BPE())
    # GPT-2 split regex; no prefix space, so a text's first word encodes as it is written.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Offsets index the original string (transformers uses them for assistant-token masks).
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return backend, trainer


def _read_lines(files: list[Path]) -> Iterator[str]:
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                yield from f
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{str(file)!r} is not UTF-8 text ({e}); convert it or leave it out"
            ) from e


def _backend_from_json(path: Path) -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer as Backend

    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
        return Backend.from_str(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); re-save the tokenizer") from e
    except Exception as e:  # `tokenizers` raises a plain Exception for JSON it cannot deserialize
        raise ValueError(f"{str(path)!r} is not a tokenizers tokenizer.json ({e})") from e


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); fix or delete it") from e


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_content(value: str | dict | None) -> str | None:
    # tokenizer_config.json writes a token either as a string or as a serialized AddedToken dict.
    return value.get("content") if isinstance(value, dict) else value


def _read_chat_template(directory: Path, config: dict) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():  # transformers >= 4.50 saves it here, and it wins over the config
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: use the one called "default"
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    return template


def _compile_template(source: str) -> jinja2.Template:
    """Compile like transformers: sandboxed, trim/lstrip blocks, loop controls, its helper names."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template is not valid jinja (line {e.lineno}: {e.message})") from e


def _tojson(x: Any, **kw: Any) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates want plain JSON (indent=... etc.).
    return json.dumps(x, **{"ensure_ascii": False, **kw})


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.TemplateError(message)

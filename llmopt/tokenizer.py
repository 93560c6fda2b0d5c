"""Tokenizer and chat template of a model folder, without importing transformers.

Reads the vocabulary through a backend (llmopt/vocab): the native SentencePiece or
byte-level BPE where the folder has a tokenizer.spm or tokenizer.bpe (a converted GGUF's,
a few MB where `tokenizers` holds 16 to 100 MB) and a C compiler is at hand, else tokenizer.json
through the `tokenizers` library. The chat template comes from tokenizer_config.json or
chat_template.jinja, rendered with a sandboxed jinja2 environment set up the way
Hugging Face templates expect.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from llmopt.errors import ModelFormatError, UsageError
from llmopt.vocab.backend import HFBackend, TokenizerBackend
from llmopt.vocab.bpe import BpeBackend
from llmopt.vocab.native import NativeBackend, native_available
from llmopt.vocab.spm import SpmBackend
from llmopt.vocab.spm_file import BPE_FILENAME
from llmopt.vocab.spm_file import FILENAME as SPM_FILENAME

# For models without a template (base models): a plain transcript.
_PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as a string or as {"content": ...}.
    return value.get("content") if isinstance(value, dict) else value


def load_backend(folder: Path) -> TokenizerBackend:
    """The native tokenizer where the folder has its file and C code can be built, else
    tokenizer.json's."""
    for name, kind in ((SPM_FILENAME, SpmBackend), (BPE_FILENAME, BpeBackend)):
        native_file = folder / name
        if native_file.is_file() and native_available():
            native: NativeBackend | None = kind.load(native_file)
            if native is not None:
                return native
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelFormatError(f"{folder} has no tokenizer.json")
    return HFBackend(path)


class Tokenizer:
    def __init__(self, folder: Path) -> None:
        self._tk = load_backend(folder)
        cfg_path = folder / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.chat_template = self._find_template(folder, cfg)

    @staticmethod
    def _find_template(folder: Path, cfg: dict[str, Any]) -> str | None:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):  # named templates: take the default one
            by_name = {t["name"]: t["template"] for t in tpl}
            tpl = by_name.get("default") or next(iter(by_name.values()), None)
        return tpl

    @property
    def vocab_size(self) -> int:
        return self._tk.vocab_size

    def same_vocabulary(self, other: Tokenizer) -> bool:
        """Whether both map every token text to the same id (a draft model's check)."""
        a, b = self._tk, other._tk
        # Two native vocabularies from one file need no dicts of 262k entries.
        quick = isinstance(a, NativeBackend) and isinstance(b, NativeBackend) and a.same_file(b)
        return quick or a.vocabulary() == b.vocabulary()

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tk.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised."""
        ids = self._tk.encode(text)
        bos = self.bos_id
        want_bos = self.add_bos if add_bos is None else add_bos
        if want_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tk.decode(ids)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat template applied to `messages`, ready for a reply. A
        model's own template writes the BOS where the model wants one; the plain
        transcript (a model without a template) gets it as any text does."""
        text = self.apply_chat_template(messages)
        return self.encode(text, add_bos=None if self.chat_template is None else False)

    @cached_property
    def _template(self) -> Any:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        def tojson(x: Any, indent: int | None = None, **_: Any) -> str:
            return json.dumps(x, ensure_ascii=False, indent=indent)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template or _PLAIN_TEMPLATE)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        from jinja2.exceptions import TemplateError

        for m in messages:
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UsageError(
                    f"bad chat message {m!r}: role must be one of {', '.join(ROLES)} "
                    "and content a string"
                )
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise UsageError(f"the model's chat template rejected the messages: {e}") from e

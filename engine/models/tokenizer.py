"""Tokenizer and chat template of a model folder, through the ``tokenizers`` library and jinja2.

transformers is not a runtime dependency, so the chat template is rendered here with a sandboxed
jinja2 environment, as transformers does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from engine.errors import ModelFormatError


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ModelTokenizer:
    """Encode/decode text and render chats for one model folder."""

    def __init__(self, folder: Path) -> None:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelFormatError(f"{folder} has no tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises plain Exceptions
            raise ModelFormatError(f"cannot load {path}: {exc}") from None
        cfg = _read_json(folder / "tokenizer_config.json")
        template = cfg.get("chat_template")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        gen = _read_json(folder / "generation_config.json")
        model_cfg = _read_json(folder / "config.json")
        eos: set[int] = set()
        for source in (gen.get("eos_token_id"), model_cfg.get("eos_token_id")):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, list):
                eos.update(v for v in source if isinstance(v, int))
        if self.eos_token is not None and (tid := self._tok.token_to_id(self.eos_token)) is not None:
            eos.add(tid)
        #: token ids that end a generation
        self.stop_ids: frozenset[int] = frozenset(eos)
        bos = model_cfg.get("bos_token_id")
        self.bos_id: int | None = bos if isinstance(bos, int) else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (chat markers) are recognised."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if special and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The prompt text for a chat, as the model's own template writes it."""
        if self.chat_template is None:
            raise ModelFormatError("this model has no chat template; use a plain prompt instead of --chat")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


class StreamDecoder:
    """Turns a growing list of token ids into text increments without splitting UTF-8 characters."""

    def __init__(self, tokenizer: ModelTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[self._emitted :]
        self._emitted = len(text)
        return delta

"""Tokenizers from `tokenizer.json` (HF `tokenizers`) or from GGUF metadata, with chat templates.

GGUF byte-level BPE ("gpt2") vocabularies are rebuilt as a `tokenizers.Tokenizer`; the split
pattern follows `tokenizer.ggml.pre` the way llama.cpp does (e.g. `smollm` splits digits one by
one, as the original SmolLM2 tokenizer does). Control tokens (`<|im_start|>`...) stay whole.
Chat templates are Jinja2, rendered in a sandbox with the same options as HF transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import AddedToken, Regex, Tokenizer as _HFTokenizer, decoders, models, pre_tokenizers


class TokenizerError(ValueError):
    pass


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre or "")
    if split:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return byte_level


class Tokenizer:
    """Encode/decode, special tokens and the chat template of one model."""

    def __init__(self, backend: _HFTokenizer, *, bos_token_id: int | None, eos_token_ids: Sequence[int],
                 add_bos: bool, chat_template: str | None, pad_token_id: int | None = None,
                 bos_token: str | None = None, eos_token: str | None = None):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(int(e) for e in eos_token_ids))
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.pad_token_id = pad_token_id if pad_token_id is not None else (self.eos_token_ids or (0,))[0]
        self.bos_token = bos_token
        self.eos_token = eos_token

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this model has no chat template; use plain prompts instead of chat mode")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise TokenizerError(f"chat messages need 'role' and 'content', got {m!r}")
        return _render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = self.apply_chat_template(messages)
        # the template writes the BOS itself where the model wants one
        return self.encode(text, add_special_tokens=False)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "Tokenizer":
        folder = Path(folder)
        tj = folder / "tokenizer.json"
        if not tj.exists():
            raise TokenizerError(f"no tokenizer.json in {folder}")
        backend = _HFTokenizer.from_file(str(tj))
        tc: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").exists():
            with open(folder / "tokenizer_config.json") as f:
                tc = json.load(f)
        gen: dict[str, Any] = {}
        if (folder / "generation_config.json").exists():
            with open(folder / "generation_config.json") as f:
                gen = json.load(f)
        cfg: dict[str, Any] = {}
        if (folder / "config.json").exists():
            with open(folder / "config.json") as f:
                cfg = json.load(f)

        def tok_str(v):
            return v.get("content") if isinstance(v, dict) else v

        bos, eos = tok_str(tc.get("bos_token")), tok_str(tc.get("eos_token"))
        eos_ids = []
        for src in (gen.get("eos_token_id"), cfg.get("eos_token_id")):
            if isinstance(src, list):
                eos_ids += src
            elif src is not None:
                eos_ids.append(src)
        if eos and backend.token_to_id(eos) is not None:
            eos_ids.append(backend.token_to_id(eos))
        bos_id = backend.token_to_id(bos) if bos else cfg.get("bos_token_id")
        template = tc.get("chat_template")
        if template is None and (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        return cls(backend, bos_token_id=bos_id, eos_token_ids=eos_ids,
                   add_bos=bool(tc.get("add_bos_token", False)), chat_template=template,
                   bos_token=bos, eos_token=eos)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> "Tokenizer":
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported (supported: gpt2 byte-level BPE)")
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {}
        for i, t in enumerate(tokens):
            key = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
            vocab.setdefault(key, i)
        backend = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        backend.decoder = decoders.ByteLevel()
        specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
        user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
        if specials:
            backend.add_special_tokens(specials)
        if user:
            backend.add_tokens(user)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        eot = meta.get("tokenizer.ggml.eot_token_id")
        eos_ids = [int(x) for x in (eos, eot) if x is not None]
        return cls(backend, bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids,
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"),
                   pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
                   bos_token=tokens[int(bos)] if bos is not None else None,
                   eos_token=tokens[int(eos)] if eos is not None else None)


def _render_chat(template: str, messages, **kwargs) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=list(messages), **kwargs)
    except TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}") from e


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece

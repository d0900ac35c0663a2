"""A :class:`~stablekit.text.tokenizer.CLIPTokenizer` to and from transformers' tokenizer files, and as JSON.

A tokenizer folder (a diffusers pipeline's ``tokenizer/``) comes in one of two layouts: ``vocab.json`` +
``merges.txt`` (the released Hub folders, transformers 4), or ``tokenizer.json`` (what transformers 5's
``save_pretrained`` writes). Either may sit beside ``tokenizer_config.json`` and ``special_tokens_map.json``,
which name the special tokens and ``model_max_length``; ``special_tokens_map.json`` wins where both do, as in
transformers, and a token neither names is transformers' ``CLIPTokenizer`` default. Added tokens
(``added_tokens.json``, ``added_tokens_decoder``, ``tokenizer.json``'s ``added_tokens``) join the vocabulary.

Every error is a :class:`TokenizerError` whose message names the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from stablekit.text.tokenizer import BOS_TOKEN, EOS_TOKEN, CLIPTokenizer, TokenizerError, Vocabulary

_MERGES_HEADER = "#version: 0.2"
# transformers writes this for "no limit" (VERY_LARGE_INTEGER); anything that large means the same.
_NO_LIMIT = 10**20

_SPECIALS: tuple[str, ...] = ("bos_token", "eos_token", "unk_token", "pad_token")

T = TypeVar("T")


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: {'missing' if not os.path.lexists(path) else 'not a regular file'}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a 4300-digit integer
        raise TokenizerError(f"{path}: not a readable JSON file: {' '.join(str(e).split())[:300]}") from e


def _read_object(path: str) -> dict[str, Any]:
    d = _read_json(path)
    if not isinstance(d, dict):
        raise TokenizerError(f"{path}: not a JSON object")
    return d


def _token_text(value: Any, where: str) -> str | None:
    """A special token as the files write it: a string, an ``AddedToken`` dict, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise TokenizerError(f"{where}: a special token is {value!r}, not a string")


def _merge_pairs(lines: list[Any], where: str) -> list[tuple[str, str]]:
    """Merges as ``"a b"`` strings or ``[a, b]`` pairs (newer ``tokenizer.json``)."""
    pairs = []
    for n, line in enumerate(lines, start=1):
        parts = line.split(" ") if isinstance(line, str) else line
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise TokenizerError(f"{where}: merge {n} is {line!r}, not two tokens")
        pairs.append((parts[0], parts[1]))
    return pairs


def _checked(make: Callable[[], T], source: str) -> T:
    """``make()``, its TokenizerError naming ``source``."""
    try:
        return make()
    except TokenizerError as e:
        raise TokenizerError(str(e) if str(e).startswith(source) else f"{source}: {e}") from e


def _vocab_files(folder: str) -> tuple[dict[str, int], list[tuple[str, str]], str]:
    vocab_path = os.path.join(folder, "vocab.json")
    vocab = _read_object(vocab_path)
    _checked(lambda: Vocabulary(vocab, []), vocab_path)
    merges_path = os.path.join(folder, "merges.txt")
    if not os.path.isfile(merges_path):
        raise TokenizerError(f"{merges_path}: missing (a vocab.json needs its merges.txt)")
    try:
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{merges_path}: cannot be read: {e}") from e
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = _merge_pairs([line.strip() for line in lines if line.strip()], merges_path)
    _checked(lambda: Vocabulary(vocab, merges), merges_path)  # the two files belong together
    added_path = os.path.join(folder, "added_tokens.json")
    if os.path.lexists(added_path):
        added = _read_object(added_path)
        vocab = {**{t: i for t, i in added.items() if t not in vocab}, **vocab}
    return vocab, merges, vocab_path


def _tokenizer_json(folder: str) -> tuple[dict[str, int], list[tuple[str, str]], str]:
    path = os.path.join(folder, "tokenizer.json")
    d = _read_object(path)
    model = d.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise TokenizerError(f"{path}: not a BPE tokenizer (model.type is not BPE)")
    if model.get("end_of_word_suffix") != "</w>":
        raise TokenizerError(f"{path}: not a CLIP tokenizer (its BPE has no </w> end-of-word suffix)")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"{path}: the vocabulary (model.vocab) is empty or missing")
    merges = _merge_pairs(list(model.get("merges") or []), path)
    for entry in d.get("added_tokens") or []:
        if isinstance(entry, dict) and isinstance(entry.get("content"), str) and entry["content"] not in vocab:
            vocab = {**vocab, entry["content"]: entry.get("id")}
    return vocab, merges, path


def read_tokenizer_folder(folder: str | os.PathLike[str]) -> CLIPTokenizer:
    """The tokenizer a transformers ``CLIPTokenizer`` folder describes."""
    folder = os.fspath(folder)
    if os.path.lexists(os.path.join(folder, "vocab.json")):
        vocab, merges, source = _vocab_files(folder)
    elif os.path.lexists(os.path.join(folder, "tokenizer.json")):
        vocab, merges, source = _tokenizer_json(folder)
    else:
        raise TokenizerError(f"{folder}: neither vocab.json + merges.txt nor tokenizer.json")
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = _read_object(config_path) if os.path.lexists(config_path) else {}
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for i, entry in decoder.items():
            content = _token_text(entry, config_path)
            if content is not None and content not in vocab and str(i).isdigit():
                vocab = {**vocab, content: int(i)}
    named = {k: _token_text(config[k], config_path) for k in _SPECIALS if k in config}
    map_path = os.path.join(folder, "special_tokens_map.json")
    if os.path.lexists(map_path):
        named |= {k: _token_text(v, map_path) for k, v in _read_object(map_path).items() if k in _SPECIALS}
    max_length = config.get("model_max_length")
    if max_length is not None and (
        isinstance(max_length, bool) or not isinstance(max_length, (int, float)) or not math.isfinite(max_length)
    ):
        raise TokenizerError(f"{config_path}: model_max_length is {max_length!r}, not a finite number")
    return _checked(
        lambda: CLIPTokenizer(
            Vocabulary(vocab, merges),
            bos=named.get("bos_token") or BOS_TOKEN,
            eos=named.get("eos_token") or EOS_TOKEN,
            unk=named.get("unk_token", EOS_TOKEN),
            pad=named.get("pad_token", EOS_TOKEN),
            max_length=int(max_length) if max_length is not None and max_length < _NO_LIMIT else None,
            source=source,
        ),
        source,
    )


def same_as_builtin(tok: CLIPTokenizer, context_length: int) -> bool:
    """Whether ``tok`` is what a model without a tokenizer of its own gets: the built-in vocabulary and specials,
    at the text encoder's ``context_length`` (padding is the text config's either way)."""
    return tok.is_builtin and tok.max_length in (None, context_length)


def tokenizer_files(tok: CLIPTokenizer, *, pad: int, max_length: int) -> dict[str, Any]:
    """File name -> content (a string, or a dict to write as JSON) of a transformers ``CLIPTokenizer`` folder for
    ``tok``, padding with id ``pad`` to ``max_length`` tokens."""
    vocab = tok.vocab
    if pad not in vocab.tokens:
        raise TokenizerError(f"pad id {pad} is not in the tokenizer's vocabulary")
    special = {
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "unk_token": tok.unk_token,
        "pad_token": vocab.tokens[pad],
    }
    return {
        "vocab.json": dict(sorted(vocab.ids.items(), key=lambda kv: kv[1])),
        "merges.txt": _MERGES_HEADER + "\n" + "".join(f"{a} {b}\n" for a, b in vocab.merges),
        "special_tokens_map.json": special,
        "tokenizer_config.json": {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": max_length,
            "do_lower_case": True,
            "errors": "replace",
            **special,
        },
    }


def tokenizer_to_json(tok: CLIPTokenizer) -> str:
    """``tok`` as one JSON string (a safetensors metadata value)."""
    return json.dumps(
        {
            "vocab": tok.vocab.ids,
            "merges": [f"{a} {b}" for a, b in tok.vocab.merges],
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "unk_token": tok.unk_token,
            "pad_token": tok.pad_token,
            "model_max_length": tok.max_length,
        },
        ensure_ascii=False,
    )


def tokenizer_from_json(text: str, source: str) -> CLIPTokenizer:
    """Inverse of :func:`tokenizer_to_json`; ``source`` names where the text came from in errors."""
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise TokenizerError(f"{source}: not valid JSON: {e}") from e
    if not isinstance(d, dict) or not isinstance(d.get("vocab"), dict) or not isinstance(d.get("merges"), list):
        raise TokenizerError(f"{source}: not a tokenizer (no vocab and merges)")
    strings = {k: d.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    if not all(v is None or isinstance(v, str) for v in strings.values()):
        raise TokenizerError(f"{source}: a special token is not a string")
    length = d.get("model_max_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)):
        raise TokenizerError(f"{source}: model_max_length {length!r} is not an integer")
    return _checked(
        lambda: CLIPTokenizer(
            Vocabulary(d["vocab"], _merge_pairs(d["merges"], source)),
            bos=strings["bos_token"] or BOS_TOKEN,
            eos=strings["eos_token"] or EOS_TOKEN,
            unk=strings["unk_token"],
            pad=strings["pad_token"],
            max_length=length,
            source=source,
        ),
        source,
    )


def write_tokenizer_files(folder: str | os.PathLike[str], files: Mapping[str, Any]) -> None:
    """Write :func:`tokenizer_files`' output into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False))

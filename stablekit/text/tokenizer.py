"""The CLIP byte-level BPE tokenizer, shared by both text encoders.

SD1 tokenized with transformers' ``CLIPTokenizer`` and SD2/x4 with ``open_clip.tokenize``; both are OpenAI
CLIP's tokenizer over the same merge list and give the same ids, except for the padding: SD1 pads with
``<|endoftext|>`` (49407), SD2/x4 with zeros (id 0 is "!"). The pad id changes the conditioning, because the
encoders attend to pad positions and the UNet cross-attends to their outputs, so it is a required argument.

Pipeline: ftfy fix -> HTML-unescape twice -> collapse whitespace -> lower-case -> CLIP word regex -> UTF-8
bytes as printable symbols -> BPE merges in rank order -> ids. The vocabulary (49408 entries) is derived from
``bpe_simple_vocab_16e6.txt.gz`` (see ``NOTICE``): 256 byte symbols, the same 256 ending a word (``</w>``),
one entry per merge, then the two specials.

Text that looks like a special token (``<|endoftext|>``) is tokenized as plain text: a prompt cannot inject
structure. transformers' tokenizer maps it to the special id instead; no real prompt is affected.
"""

from __future__ import annotations

import functools
import gzip
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import regex
import torch
from torch import Tensor

SOT = 49406  # <|startoftext|>
EOT = 49407  # <|endoftext|>
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77

_VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
_NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894: merge-file lines 1..48894 (line 0 is a version header)
_END = "</w>"
# Contractions, runs of letters, single digits, runs of anything else that is not a space.
_WORD = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
# Distinct words seen by one tokenizer before its BPE cache is emptied (a server sees unbounded text).
_CACHE_LIMIT = 100_000


def _byte_symbols() -> tuple[list[str], dict[int, str]]:
    """The 256 base symbols in vocabulary order, and the symbol standing for each byte value.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, soft hyphen...) take code
    points 256.. in byte order, so BPE never sees whitespace. Vocabulary order is printable bytes first.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    rest = sorted(set(range(256)) - set(printable))
    symbol = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(rest)}
    return [symbol[b] for b in printable + rest], symbol


@dataclass(frozen=True)
class _Vocab:
    tokens: list[str]  # id -> BPE token
    ids: dict[str, int]  # BPE token -> id
    ranks: dict[tuple[str, str], int]  # merge -> priority (lower merges first)
    # str.translate tables between the Latin-1 reading of UTF-8 bytes and the byte symbols.
    to_symbols: dict[int, str]
    from_symbols: dict[int, str]


@functools.cache
def _load_vocab() -> _Vocab:
    lines = gzip.decompress(_VOCAB_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    base, symbol = _byte_symbols()
    tokens = [*base, *(s + _END for s in base), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != VOCAB_SIZE or any(len(m) != 2 for m in merges):
        raise RuntimeError(f"{_VOCAB_FILE.name} is damaged: built {len(tokens)} tokens, want {VOCAB_SIZE}")
    return _Vocab(
        tokens=tokens,
        ids={t: i for i, t in enumerate(tokens)},
        ranks={(m[0], m[1]): i for i, m in enumerate(merges)},
        to_symbols=dict(symbol),
        from_symbols={ord(s): chr(b) for b, s in symbol.items()},
    )


def _clean(text: str) -> str:
    # Imported here: ftfy costs ~0.1 s to import and only tokenizing needs it.
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split())


@dataclass(frozen=True)
class Tokens:
    """A tokenized batch. ``dropped[i]`` is the end of prompt ``i`` that did not fit (cleaned text, original
    case where it could be kept), or None when the whole prompt fits."""

    ids: Tensor  # (B, context_length) int64: [SOT] + up to context_length - 2 tokens + [EOT] + padding
    dropped: list[str | None]


class CLIPTokenizer:
    """OpenAI CLIP's tokenizer. The vocabulary is read once per process, on first construction."""

    def __init__(self) -> None:
        self._vocab = _load_vocab()
        self._cache: dict[str, tuple[int, ...]] = {}

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one regex word given as byte symbols."""
        if (hit := self._cache.get(word)) is not None:
            return hit
        ranks = self._vocab.ranks
        parts = [*word[:-1], word[-1] + _END]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:], strict=False), key=lambda pair: ranks.get(pair, _NUM_MERGES))
            if best not in ranks:
                break
            # Merge every occurrence of the best pair, scanning left to right without overlap.
            merged: list[str] = []
            i = 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == best[0] and parts[i + 1] == best[1]:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = tuple(self._vocab.ids[p] for p in parts)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _words(self, text: str) -> tuple[str, list[tuple[int, int, tuple[int, ...]]]]:
        """The cleaned text to show the user, and (start, end, ids) of each word in it."""
        cleaned = _clean(text)
        lowered = cleaned.lower()
        # lower() can lengthen a few characters (İ -> i̇); then spans only index the lower-cased text.
        shown = cleaned if len(lowered) == len(cleaned) else lowered
        table = self._vocab.to_symbols
        words = []
        for m in _WORD.finditer(lowered):
            symbols = m.group().encode("utf-8").decode("latin-1").translate(table)
            words.append((m.start(), m.end(), self._bpe(symbols)))
        return shown, words

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without start/end tokens and without truncation."""
        return [i for _, _, ids in self._words(text)[1] for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids: cleaned, lower-cased, a space after every regex word (so "42," reads
        "4 2 ,"); special tokens are skipped."""
        tokens = self._vocab.tokens
        symbols = "".join(tokens[i] for i in ids if i < SOT).replace(_END, " ")
        raw = symbols.translate(self._vocab.from_symbols).encode("latin-1")
        return raw.decode("utf-8", errors="replace").strip()

    def tokenize(self, prompts: str | Sequence[str], *, pad_token: int, context_length: int = CONTEXT_LENGTH) -> Tokens:
        """Ids (B, context_length): [SOT] + tokens + [EOT], padded with ``pad_token``.

        Prompts longer than ``context_length - 2`` tokens are cut and still end in EOT; the cut-off text
        is returned in ``Tokens.dropped`` so the caller can tell the user.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        room = context_length - 2
        ids = torch.full((len(prompts), context_length), pad_token, dtype=torch.long)
        dropped: list[str | None] = []
        for row, prompt in enumerate(prompts):
            shown, words = self._words(prompt)
            kept: list[int] = []
            cut: str | None = None
            for start, end, word_ids in words:
                if len(kept) + len(word_ids) <= room:
                    kept.extend(word_ids)
                    continue
                fits = room - len(kept)
                kept.extend(word_ids[:fits])
                tail = self.decode(word_ids[fits:]) if fits else shown[start:end]
                if shown[end - len(tail) : end].lower() == tail.lower():
                    tail = shown[end - len(tail) : end]  # the user's case
                cut = (tail + shown[end:]).strip()
                break
            seq = [SOT, *kept, EOT]
            ids[row, : len(seq)] = torch.tensor(seq)
            dropped.append(cut)
        return Tokens(ids=ids, dropped=dropped)


@functools.cache
def default_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


def tokenize(prompts: str | Sequence[str], *, pad_token: int, context_length: int = CONTEXT_LENGTH) -> Tokens:
    """:meth:`CLIPTokenizer.tokenize` with the process-wide tokenizer (its BPE cache is shared)."""
    return default_tokenizer().tokenize(prompts, pad_token=pad_token, context_length=context_length)

"""The CLIP byte-level BPE tokenizer, shared by both text encoders.

The built-in vocabulary is OpenAI CLIP's, which every released model uses. A :class:`CLIPTokenizer` can also
hold another byte-level BPE vocabulary (a diffusers folder's own ``tokenizer/``, read by
:mod:`stablekit.text.files`): then its ids, merges and special tokens are that vocabulary's, and the text
pipeline below stays CLIP's.

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

A piece that BPE leaves outside the vocabulary (only possible in a vocabulary lacking some byte symbols) becomes
the unknown token, as transformers' ``CLIPTokenizer`` does.
"""

from __future__ import annotations

import copy
import functools
import gzip
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import regex
import torch
from torch import Tensor

SOT = 49406  # <|startoftext|>
EOT = 49407  # <|endoftext|>
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
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


class TokenizerError(ValueError):
    """A vocabulary or tokenizer setting that cannot work; the message names the file it came from."""


class Vocabulary:
    """A byte-level BPE vocabulary: token <-> id, and the merges in rank order (lower merges first).

    Checked as the ``tokenizers`` library checks a BPE model: ids are distinct non-negative integers, and both
    halves of every merge and their join are tokens. Raises :class:`TokenizerError` with the reason.
    """

    def __init__(self, ids: Mapping[str, int], merges: Sequence[tuple[str, str]]) -> None:
        if not ids:
            raise TokenizerError("the vocabulary is empty")
        # Ids index an embedding: one past 2**24 would be a table of 16M rows, far past any CLIP vocabulary.
        bad = next(
            (t for t, i in ids.items() if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 2**24), None
        )
        if bad is not None:
            raise TokenizerError(f"token {bad!r} has id {ids[bad]!r}, not an integer in [0, 2**24)")
        self.ids = dict(ids)
        self.tokens = {i: t for t, i in self.ids.items()}  # id -> token
        if len(self.tokens) != len(self.ids):
            raise TokenizerError("two tokens share one id")
        self.merges = [(a, b) for a, b in merges]
        for n, (a, b) in enumerate(self.merges, start=1):
            missing = next((t for t in (a, b, a + b) if t not in self.ids), None)
            if missing is not None:
                raise TokenizerError(f"merge {n} ({a} {b}) makes or uses {missing!r}, which is not in the vocabulary")
        self.ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(self.merges):
            self.ranks.setdefault(merge, rank)

    def __len__(self) -> int:
        """One more than the largest id: the embedding rows a text encoder needs for every token."""
        return max(self.tokens) + 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and (self.ids, self.merges) == (other.ids, other.merges)

    __hash__ = None  # type: ignore[assignment]


@functools.cache
def builtin_vocabulary() -> Vocabulary:
    """OpenAI CLIP's vocabulary, read once per process."""
    lines = gzip.decompress(_VOCAB_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    base = _byte_symbols()[0]
    tokens = [*base, *(s + _END for s in base), *("".join(m) for m in merges)]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != VOCAB_SIZE or any(len(m) != 2 for m in merges):
        raise RuntimeError(f"{_VOCAB_FILE.name} is damaged: built {len(tokens)} tokens, want {VOCAB_SIZE}")
    return Vocabulary({t: i for i, t in enumerate(tokens)}, [(m[0], m[1]) for m in merges])


# str.translate tables between the Latin-1 reading of UTF-8 bytes and the byte symbols (every byte-level BPE
# vocabulary shares them).
_TO_SYMBOLS: dict[int, str] = dict(_byte_symbols()[1])
_FROM_SYMBOLS: dict[int, str] = {ord(s): chr(b) for b, s in _byte_symbols()[1].items()}


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
    """CLIP's tokenizer over ``vocab`` (default: the built-in vocabulary, read once per process).

    ``bos``, ``eos``, ``unk`` and ``pad`` are the special tokens as text (transformers' ``CLIPTokenizer``
    defaults). ``pad`` and ``max_length`` are what a tokenizer folder says; None leaves them to the caller, as for
    the built-in vocabulary, whose padding depends on the family. ``source`` names the vocabulary's file in
    messages. Raises :class:`TokenizerError` when a special token is not in the vocabulary.
    """

    def __init__(
        self,
        vocab: Vocabulary | None = None,
        *,
        bos: str = BOS_TOKEN,
        eos: str = EOS_TOKEN,
        unk: str | None = EOS_TOKEN,
        pad: str | None = None,
        max_length: int | None = None,
        source: str = "the built-in CLIP vocabulary",
    ) -> None:
        self.vocab = vocab if vocab is not None else builtin_vocabulary()
        self.source = source
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos, eos, unk, pad
        self.bos_id = self._special(bos, "start")
        self.eos_id = self._special(eos, "end")
        self.pad_id = None if pad is None else self._special(pad, "pad")
        # transformers would append a missing unknown token as a new id; here a piece needing it is an error.
        self.unk_id = None if unk is None else self.vocab.ids.get(unk)
        if max_length is not None and max_length < 2:
            raise TokenizerError(f"{source}: model_max_length {max_length} leaves no room for the start and end tokens")
        self.max_length = max_length
        self._skipped = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}
        self._no_merge = len(self.vocab.merges)
        self._cache: dict[str, tuple[int, ...]] = {}
        # Added tokens (textual-inversion triggers): text -> ids, id -> text to decode, and their matcher.
        self._added: dict[str, tuple[int, ...]] = {}
        self._added_text: dict[int, str] = {}
        self._added_re: regex.Pattern[str] | None = None

    def with_added_tokens(self, added: Mapping[str, Sequence[int]]) -> CLIPTokenizer:
        """A copy that reads each key of ``added`` as its ids (a textual-inversion trigger and its vectors' rows).

        As transformers' ``CLIPTokenizer`` matches added tokens, a trigger is found in the raw text before cleaning,
        longest first, also inside a word, and in any case (its normalizer lower-cases first, and A1111 matches token
        ids of lower-cased text); the text around it is tokenized as before.
        """
        new = copy.copy(self)
        new._added = {**self._added, **{text.lower(): tuple(ids) for text, ids in added.items()}}
        new._added_text = {ids[i]: text if i == 0 else "" for text, ids in new._added.items() for i in range(len(ids))}
        longest_first = sorted(new._added, key=len, reverse=True)
        pattern = "|".join(map(regex.escape, longest_first))
        new._added_re = regex.compile(pattern, regex.IGNORECASE) if longest_first else None
        return new

    @property
    def added_tokens(self) -> dict[str, tuple[int, ...]]:
        """Added token text (lower-cased) -> its ids (see :meth:`with_added_tokens`)."""
        return dict(self._added)

    def mismatch(self, *, vocab_size: int, context_length: int, pad_token: int) -> str | None:
        """Why this tokenizer cannot feed a text encoder of ``vocab_size`` token embeddings and ``context_length``
        positions padding with ``pad_token``, or None when it can."""
        if len(self.vocab) > vocab_size:
            return (
                f"{self.source} has token ids up to {len(self.vocab) - 1}, but the text encoder embeds only "
                f"{vocab_size} tokens"
            )
        if not 0 <= pad_token < vocab_size:
            return f"pad id {pad_token} is outside the text encoder's {vocab_size}-token vocabulary"
        if self.max_length is not None and self.max_length > context_length:
            return (
                f"{self.source} pads prompts to {self.max_length} tokens, but the text encoder has only "
                f"{context_length} positions"
            )
        return None

    def _special(self, token: str, what: str) -> int:
        if token not in self.vocab.ids:
            raise TokenizerError(f"{self.source}: the {what} token {token!r} is not in the vocabulary")
        return self.vocab.ids[token]

    @property
    def is_builtin(self) -> bool:
        """Whether the vocabulary and specials are the built-in CLIP ones (padding aside)."""
        same = self.vocab is builtin_vocabulary() or self.vocab == builtin_vocabulary()
        specials = (self.bos_token, self.eos_token, self.unk_token) == (BOS_TOKEN, EOS_TOKEN, EOS_TOKEN)
        return same and specials and not self._added

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one regex word given as byte symbols."""
        if (hit := self._cache.get(word)) is not None:
            return hit
        ranks, none = self.vocab.ranks, self._no_merge
        parts = [*word[:-1], word[-1] + _END]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:], strict=False), key=lambda pair: ranks.get(pair, none))
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
        ids = tuple(self._id(p) for p in parts)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def _id(self, piece: str) -> int:
        found = self.vocab.ids.get(piece, self.unk_id)
        if found is None:
            text = piece.removesuffix(_END).translate(_FROM_SYMBOLS).encode("latin-1", "replace")
            raise TokenizerError(
                f"{self.source}: {text.decode('utf-8', 'replace')!r} is not in the vocabulary, which has no "
                "unknown token"
            )
        return found

    def _words(self, text: str) -> tuple[str, list[tuple[int, int, tuple[int, ...]]]]:
        """The cleaned text to show the user, and (start, end, ids) of each word in it."""
        if self._added_re is None:
            return self._plain_words(text)
        shown, words = "", []
        pos = 0
        for piece in [*self._added_re.finditer(text), None]:
            end = len(text) if piece is None else piece.start()
            part_shown, part_words = self._plain_words(text[pos:end])
            if piece is not None:
                found = piece.group()
                part_shown = f"{part_shown} {found}".lstrip()
                part_words.append((len(part_shown) - len(found), len(part_shown), self._added[found.lower()]))
                pos = piece.end()
            if part_shown:
                base = len(shown) + 1 if shown else 0  # the pieces are shown joined by one space
                shown = f"{shown} {part_shown}" if shown else part_shown
                words += [(base + s, base + e, ids) for s, e, ids in part_words]
        return shown, words

    def _plain_words(self, text: str) -> tuple[str, list[tuple[int, int, tuple[int, ...]]]]:
        cleaned = _clean(text)
        lowered = cleaned.lower()
        # lower() can lengthen a few characters (İ -> i̇); then spans only index the lower-cased text.
        shown = cleaned if len(lowered) == len(cleaned) else lowered
        words = []
        for m in _WORD.finditer(lowered):
            symbols = m.group().encode("utf-8").decode("latin-1").translate(_TO_SYMBOLS)
            words.append((m.start(), m.end(), self._bpe(symbols)))
        return shown, words

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without start/end tokens and without truncation."""
        return [i for _, _, ids in self._words(text)[1] for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids: cleaned, lower-cased, a space after every regex word (so "42," reads
        "4 2 ,"); start, end and pad tokens are skipped, and an added token reads as its text."""
        tokens = self.vocab.tokens
        texts: list[str] = []
        run: list[int] = []
        for i in [*ids, None]:
            if i is None or i in self._added_text:
                symbols = "".join(tokens.get(j, "") for j in run if j not in self._skipped).replace(_END, " ")
                raw = symbols.translate(_FROM_SYMBOLS).encode("latin-1", "replace")
                texts += [raw.decode("utf-8", errors="replace").strip(), "" if i is None else self._added_text[i]]
                run = []
            else:
                run.append(i)
        return " ".join(t for t in texts if t)

    def tokenize(
        self, prompts: str | Sequence[str], *, pad_token: int | None = None, context_length: int | None = None
    ) -> Tokens:
        """Ids (B, context_length): [start] + tokens + [end], padded with ``pad_token``. Either defaults to what
        the tokenizer's files said (``pad``, ``max_length``); the length then to CLIP's 77.

        Prompts longer than ``context_length - 2`` tokens are cut and still end in the end token; the cut-off
        text is returned in ``Tokens.dropped`` so the caller can tell the user.
        """
        pad = pad_token if pad_token is not None else self.pad_id
        if pad is None:
            raise TokenizerError(f"{self.source}: no pad token given")
        length = context_length or self.max_length or CONTEXT_LENGTH
        if isinstance(prompts, str):
            prompts = [prompts]
        room = length - 2
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)
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
            seq = [self.bos_id, *kept, self.eos_id]
            ids[row, : len(seq)] = torch.tensor(seq)
            dropped.append(cut)
        return Tokens(ids=ids, dropped=dropped)


@functools.cache
def default_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer()


def tokenize(prompts: str | Sequence[str], *, pad_token: int, context_length: int = CONTEXT_LENGTH) -> Tokens:
    """:meth:`CLIPTokenizer.tokenize` with the process-wide tokenizer (its BPE cache is shared)."""
    return default_tokenizer().tokenize(prompts, pad_token=pad_token, context_length=context_length)

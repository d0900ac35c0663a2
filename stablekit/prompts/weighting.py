"""Prompts of any length, with A1111 weights, -> the UNet's context, the way AUTOMATIC1111 builds it.

A prompt is parsed into weighted fragments (:mod:`stablekit.prompts.syntax`), each fragment tokenized on its
own, and the tokens, each carrying its fragment's weight, are cut into chunks of 75. Each chunk is encoded on its
own as ``[start] + tokens + [end] + padding`` (77 ids); the weights scale the encoder's output rows, and the
chunks' outputs are concatenated along the sequence: a prompt of k chunks conditions the UNet on 77·k tokens.

Two differences from A1111, both so that a prompt's context does not depend on the prompts batched with it: A1111
restores the mean of a chunk over the whole batch, here over each prompt's chunk; and A1111 pads the shorter of the
prompt and negative prompt after encoding, here every prompt in one call is padded to the same chunk count before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from stablekit.prompts.syntax import BREAK, parse_prompt_attention
from stablekit.text.tokenizer import CONTEXT_LENGTH, CLIPTokenizer

# When a chunk fills up, A1111 (its default ``comma_padding_backtrack``) moves the words after the chunk's last comma
# to the next chunk if that comma is at most this many tokens back, so a phrase is not cut in two.
COMMA_BACKTRACK = 20


@dataclass(frozen=True)
class WeightedTokens:
    """Prompts cut into chunks: ``ids[b, c]`` is chunk c of prompt b, ready for the text encoder."""

    ids: Tensor  # (B, k, T) int64: [start] + up to T - 2 tokens + [end] + padding
    weights: Tensor  # (B, k, T) float32: each token's fragment weight; 1.0 on start, end and padding

    @property
    def chunks(self) -> int:
        return self.ids.shape[1]


def tokenize_weighted(
    prompts: Sequence[str],
    tokenizer: CLIPTokenizer,
    *,
    pad_token: int,
    weighting: bool = True,
    min_chunks: int = 1,
    context_length: int = CONTEXT_LENGTH,
) -> WeightedTokens:
    """Chunked ids and weights of ``prompts``, every prompt padded with empty chunks to the same count (at least
    ``min_chunks``). Without ``weighting`` the text is taken literally, as A1111's emphasis "None": no brackets,
    no ``BREAK``, every weight 1.0; long prompts are still chunked."""
    rows = [_chunks(p, tokenizer, weighting, context_length - 2) for p in prompts]
    k = max([min_chunks, *(len(r) for r in rows)])
    ids = torch.full((len(prompts), k, context_length), pad_token, dtype=torch.long)
    weights = torch.ones(len(prompts), k, context_length)
    for b, chunks in enumerate(rows):
        # Padding chunks are empty prompts: [start] + [end] + padding, as A1111 pads the shorter conditioning.
        chunks = chunks + [([], [])] * (k - len(chunks))
        for c, (tokens, token_weights) in enumerate(chunks):
            seq = [tokenizer.bos_id, *tokens, tokenizer.eos_id]
            ids[b, c, : len(seq)] = torch.tensor(seq)
            weights[b, c, 1 : 1 + len(tokens)] = torch.tensor(token_weights)
    return WeightedTokens(ids=ids, weights=weights)


def apply_weights(z: Tensor, weights: Tensor) -> Tensor:
    """A1111's emphasis on encoder output ``z`` (N, T, D) with ``weights`` (N, T): scale each token's row by its
    weight, then rescale each chunk so that its mean over all of its values is what it was before."""
    if bool((weights == 1).all()):
        return z  # exactly unchanged: an unweighted prompt must match the plain single-chunk path bit for bit
    before = z.float().mean(dim=(1, 2), keepdim=True)  # (N, 1, 1)
    weighted = z.float() * weights.to(z.device, torch.float32)[..., None]  # (N, T, D)
    after = weighted.mean(dim=(1, 2), keepdim=True)
    return (weighted * (before / after)).to(z.dtype)


def encode_prompts(
    prompts: Sequence[str],
    tokenizer: CLIPTokenizer,
    encode: Callable[[Tensor], Tensor],
    *,
    pad_token: int,
    weighting: bool = True,
    min_chunks: int = 1,
    context_length: int = CONTEXT_LENGTH,
) -> tuple[Tensor, int]:
    """The context (B, T·k, D) of ``prompts`` and its chunk count k (at least ``min_chunks``).

    ``encode`` maps ids (N, T) int64 to embeddings (N, T, D); it is called once, on all B·k chunks. Pass prompts
    and negative prompts in one call (see :func:`encode_pair`) so both come out with the same k, as classifier-free
    guidance needs.
    """
    tokens = tokenize_weighted(
        prompts,
        tokenizer,
        pad_token=pad_token,
        weighting=weighting,
        min_chunks=min_chunks,
        context_length=context_length,
    )
    b, k, t = tokens.ids.shape
    z = encode(tokens.ids.reshape(b * k, t))  # (B·k, T, D)
    z = apply_weights(z, tokens.weights.reshape(b * k, t))
    return z.reshape(b, k * t, z.shape[-1]), k  # chunk c of prompt b is positions c·T .. (c+1)·T - 1


def encode_pair(
    prompts: Sequence[str],
    negatives: Sequence[str],
    tokenizer: CLIPTokenizer,
    encode: Callable[[Tensor], Tensor],
    *,
    pad_token: int,
    weighting: bool = True,
    context_length: int = CONTEXT_LENGTH,
) -> tuple[Tensor, Tensor]:
    """Contexts of ``prompts`` and ``negatives`` (each (B, T·k, D)), padded to the same chunk count k."""
    both, _ = encode_prompts(
        [*prompts, *negatives],
        tokenizer,
        encode,
        pad_token=pad_token,
        weighting=weighting,
        context_length=context_length,
    )
    return both[: len(prompts)], both[len(prompts) :]


def _chunks(prompt: str, tokenizer: CLIPTokenizer, weighting: bool, size: int) -> list[tuple[list[int], list[float]]]:
    """(tokens, weights) of each chunk of ``prompt``: at most ``size`` tokens each, at least one chunk."""
    fragments = parse_prompt_attention(prompt) if weighting else [(prompt, 1.0)]
    comma = tokenizer.vocab.ids.get(",</w>")
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1  # position in ``tokens`` of the current chunk's last comma

    def close() -> None:
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for text, weight in fragments:
        if (text, weight) == BREAK:
            close()  # even an empty chunk: "BREAK a" starts with an empty chunk, as in A1111
            continue
        for token in tokenizer.encode(text):
            # A full chunk closes only when one more token arrives, so a prompt of exactly ``size`` tokens, or one
            # followed by BREAK, is one chunk. A comma arriving then goes to the next chunk whole.
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == size and last_comma != -1 and size - last_comma <= COMMA_BACKTRACK:
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = moved[0], moved[1]
            if len(tokens) == size:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close()
    return chunks

"""A1111's prompt language: the attention parser against A1111's own docstring examples, and chunking and
weighting against a tiny random text encoder run by hand on ids built by hand."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from stablekit.models.clip import text_encoder
from stablekit.prompts.syntax import parse_prompt_attention
from stablekit.prompts.weighting import encode_pair, encode_prompts, tokenize_weighted
from stablekit.text.tokenizer import EOT, SOT, CLIPTokenizer
from tests.tiny import TINY_TEXT_SD1

Encode = Callable[[Tensor], Tensor]

# The examples in the docstring of A1111's modules/prompt_parser.py parse_prompt_attention, typed in by hand.
A1111_DOCSTRING: list[tuple[str, list[tuple[str, float]]]] = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]

MORE_SYNTAX: list[tuple[str, list[tuple[str, float]]]] = [
    ("", [("", 1.0)]),
    ("((word))", [("word", 1.1 * 1.1)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]", [("word", (1 / 1.1) * (1 / 1.1))]),  # the unclosed outer bracket still applies
    ("(word:1.3)", [("word", 1.3)]),
    ("a ( word : 0.5 ) b", [("a ", 1.0), (" word ", 0.5), (" b", 1.0)]),
    ("\\\\ and \\)", [("\\ and )", 1.0)]),
    ("a) b] c:1.2)", [("a) b] c:1.2)", 1.0)]),  # closers with nothing open are text
    ("C:\\path", [("C:path", 1.0)]),  # a backslash escaping nothing is dropped, as in A1111
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1), ("a dog", 1.0)]),
    ("BREAK", [("BREAK", -1)]),
    ("(red BREAK blue)", [("red", 1.1), ("BREAK", -1), ("blue", 1.1)]),
    ("break BREAKfast", [("break BREAKfast", 1.0)]),  # only the upper-case word of its own
]


@pytest.mark.parametrize(("text", "expected"), A1111_DOCSTRING + MORE_SYNTAX)
def test_parse_prompt_attention(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_prompt_attention(text) == expected


# --- chunking and weighting -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def encode() -> Encode:
    torch.manual_seed(0)
    model = text_encoder(TINY_TEXT_SD1).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            # Final LayerNorm rows have mean ~0 at the default init, which makes the mean restoration ill-posed;
            # a released encoder's learned bias keeps it away from 0.
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.5 + 0.2 * torch.randn(m.bias.shape, generator=gen))

    def run(ids: Tensor) -> Tensor:  # (N, 77) -> (N, 77, 32)
        assert ids.dtype == torch.long and ids.shape[1] == 77
        with torch.no_grad():
            return model(ids)

    return run


def _id(tok: CLIPTokenizer, word: str) -> int:
    (token,) = tok.encode(word)
    return token


def _row(tokens: list[int], pad: int = EOT) -> Tensor:
    """[start] + tokens + [end] + padding, built by hand: (77,)."""
    return torch.tensor([SOT, *tokens, EOT] + [pad] * (75 - len(tokens)))


def _chunk_ids(tok: CLIPTokenizer, prompt: str) -> Tensor:
    return tokenize_weighted([prompt], tok, pad_token=EOT).ids[0]  # (k, 77)


@pytest.mark.parametrize("pad", [EOT, 0])
def test_one_chunk_unweighted_is_plain_tokenization(tok: CLIPTokenizer, encode: Encode, pad: int) -> None:
    prompts = ["a photograph of an astronaut riding a horse, trending on artstation", "", "cat " * 75]
    tokens = tokenize_weighted(prompts, tok, pad_token=pad)
    plain = tok.tokenize(prompts, pad_token=pad).ids
    assert tokens.chunks == 1
    assert torch.equal(tokens.ids[:, 0], plain)
    assert bool((tokens.weights == 1).all())
    context, k = encode_prompts(prompts, tok, encode, pad_token=pad)
    assert k == 1
    assert torch.equal(context, encode(plain))


def test_100_tokens_make_two_chunks(tok: CLIPTokenizer, encode: Encode) -> None:
    cat = _id(tok, "cat")
    rows = torch.stack([_row([cat] * 75), _row([cat] * 25)])  # (2, 77)
    context, k = encode_prompts(["cat " * 100], tok, encode, pad_token=EOT)
    assert k == 2 and context.shape == (1, 154, 32)
    expected = encode(rows)  # (2, 77, 32)
    torch.testing.assert_close(context[0, :77], expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(context[0, 77:], expected[1], rtol=0, atol=1e-6)


def test_padding_with_zero_follows_the_end_token(tok: CLIPTokenizer) -> None:
    cat = _id(tok, "cat")
    ids = tokenize_weighted(["cat " * 80], tok, pad_token=0).ids[0]
    assert torch.equal(ids, torch.stack([_row([cat] * 75, pad=0), _row([cat] * 5, pad=0)]))


def test_full_chunk_backtracks_to_a_comma_within_20_tokens(tok: CLIPTokenizer) -> None:
    cat, dog, comma = _id(tok, "cat"), _id(tok, "dog"), _id(tok, ",")
    # Comma at position 69: the 6 tokens after it would be cut, so they move to the next chunk.
    ids = _chunk_ids(tok, "cat " * 69 + ", " + "dog " * 30)
    assert torch.equal(ids, torch.stack([_row([cat] * 69 + [comma]), _row([dog] * 30)]))
    # Comma at position 50: 25 tokens back is too far, the chunk is cut at 75.
    ids = _chunk_ids(tok, "cat " * 50 + ", " + "dog " * 40)
    assert torch.equal(ids, torch.stack([_row([cat] * 50 + [comma] + [dog] * 24), _row([dog] * 16)]))


def test_weight_scales_its_token_then_restores_the_mean(tok: CLIPTokenizer, encode: Encode) -> None:
    a, cat, sat = _id(tok, "a"), _id(tok, "cat"), _id(tok, "sat")
    z = encode(_row([a, cat, sat])[None])  # (1, 77, 32)
    expected = z.clone()
    expected[0, 2] *= 1.5  # "cat" sits after the start token
    expected *= z.mean() / expected.mean()
    context, k = encode_prompts(["a (cat:1.5) sat"], tok, encode, pad_token=EOT)
    assert k == 1
    torch.testing.assert_close(context, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(context, z, atol=1e-3)


def test_weights_do_not_depend_on_the_batch(tok: CLIPTokenizer, encode: Encode) -> None:
    alone, _ = encode_prompts(["a (cat:1.5) [sat]"], tok, encode, pad_token=EOT)
    batched, _ = encode_prompts(["a (cat:1.5) [sat]", "((dog))"], tok, encode, pad_token=EOT)
    torch.testing.assert_close(batched[:1], alone, rtol=1e-5, atol=1e-5)


def test_break_ends_a_chunk(tok: CLIPTokenizer, encode: Encode) -> None:
    a, cat, dog = _id(tok, "a"), _id(tok, "cat"), _id(tok, "dog")
    ids = _chunk_ids(tok, "a cat BREAK a dog")
    assert torch.equal(ids, torch.stack([_row([a, cat]), _row([a, dog])]))
    assert torch.equal(_chunk_ids(tok, "BREAK a dog"), torch.stack([_row([]), _row([a, dog])]))
    assert torch.equal(_chunk_ids(tok, "a cat BREAK"), _row([a, cat])[None])
    # A full chunk closes at the BREAK, not before it.
    assert torch.equal(_chunk_ids(tok, "cat " * 75 + "BREAK dog"), torch.stack([_row([cat] * 75), _row([dog])]))
    context, k = encode_prompts(["a cat BREAK a dog"], tok, encode, pad_token=EOT)
    assert k == 2
    torch.testing.assert_close(context[0], encode(ids).reshape(154, 32), rtol=0, atol=1e-6)


def test_literal_mode_reads_brackets_and_break_as_text(tok: CLIPTokenizer, encode: Encode) -> None:
    prompt = "a (cat:1.5) BREAK [dog]"
    plain = tok.tokenize([prompt], pad_token=EOT).ids
    tokens = tokenize_weighted([prompt], tok, pad_token=EOT, weighting=False)
    assert torch.equal(tokens.ids[:, 0], plain) and tokens.chunks == 1
    context, _ = encode_prompts([prompt], tok, encode, pad_token=EOT, weighting=False)
    assert torch.equal(context, encode(plain))
    # Long literal prompts are still chunked.
    assert tokenize_weighted(["(cat) " * 30], tok, pad_token=EOT, weighting=False).chunks == 2


def test_negatives_padded_to_the_same_chunk_count(tok: CLIPTokenizer, encode: Encode) -> None:
    blurry = tok.encode("blurry")
    empty = encode(_row([])[None])[0]  # (77, 32): an empty prompt, as A1111 pads
    cond, uncond = encode_pair(["cat " * 100], ["blurry"], tok, encode, pad_token=EOT)
    assert cond.shape == uncond.shape == (1, 154, 32)
    torch.testing.assert_close(uncond[0, :77], encode(_row(blurry)[None])[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond[0, 77:], empty, rtol=0, atol=1e-6)
    # A longer negative pads the prompt instead.
    cond, uncond = encode_pair(["blurry"], ["cat " * 160], tok, encode, pad_token=EOT)
    assert cond.shape == uncond.shape == (1, 231, 32)
    torch.testing.assert_close(cond[0, 77:154], empty, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond[0, 154:], empty, rtol=0, atol=1e-6)
    # Or in two calls, the second told the first's chunk count.
    _, k = encode_prompts(["cat " * 100], tok, encode, pad_token=EOT)
    uncond, k_neg = encode_prompts(["blurry"], tok, encode, pad_token=EOT, min_chunks=k)
    assert k_neg == k == 2 and uncond.shape == (1, 154, 32)

"""Our CLIP tokenizer against open_clip's (SD2, pad 0) and transformers' (SD1, pad 49407)."""

from __future__ import annotations

import hashlib
import html
import json
from pathlib import Path

import ftfy
import pytest
import torch

from stablekit.text.files import read_tokenizer_folder, tokenizer_from_json, tokenizer_to_json
from stablekit.text.tokenizer import _VOCAB_FILE, EOT, SOT, CLIPTokenizer, TokenizerError, tokenize
from tests.oracles import hf_clip_tokenizer, open_clip_module, tiny_clip_tokenizer

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Portrait of a Cat, oil on canvas; trending on ArtStation!!! (masterpiece:1.2) [bad hands]",
    "the year 1984, 3.14159 and 1,000,000 + 42% -- don't, we're, it'll, you'd, I'm, they've, it's",
    "東京の夜景、ネオンが光る街並み",
    "한국어 텍스트와 中文 混合",
    "café naïve Ünïcödé crème brûlée, Straße",
    "Москва зимой, красная площадь",
    "مرحبا بالعالم",
    "a cat 🐱 with a party hat 🎉🎉 and a ninja 🐱‍👤",
    "tom &amp; jerry &amp;amp; friends &lt;3 &quot;quoted&quot; &#39;x&#39;",
    "   lots \t of\n\n  extra    whitespace   ",
    "",
    "   ",
    "Ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ and ‘curly’ “quotes”",
    "İstanbul at dusk",
    "word " * 100,
    "supercalifragilisticexpialidocious " * 30,
    ", ".join(f"detail {i}" for i in range(60)),
]


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer()


def test_shipped_vocab_is_the_released_file() -> None:
    digest = hashlib.sha256(_VOCAB_FILE.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def test_matches_open_clip_pad_zero() -> None:
    oc = open_clip_module("tokenizer")
    got = tokenize(PROMPTS, pad_token=0)
    want = oc.tokenize(PROMPTS)
    assert got.ids.dtype == torch.long and got.ids.shape == (len(PROMPTS), 77)
    for prompt, a, b in zip(PROMPTS, got.ids, want, strict=True):
        assert torch.equal(a, b), prompt


def test_encode_matches_open_clip_without_specials(ours: CLIPTokenizer) -> None:
    oc = open_clip_module("tokenizer")
    for prompt in PROMPTS:
        assert ours.encode(prompt) == oc._tokenizer.encode(prompt), prompt


def test_matches_transformers_pad_eot(tmp_path: Path) -> None:
    hf = hf_clip_tokenizer(tmp_path)
    # transformers 5's tokenizer is the tokenizers-library one: it skips the ftfy fix and HTML unescaping
    # that OpenAI's (and transformers 4's slow) tokenizer did, so those steps are applied to its input here.
    cleaned = [html.unescape(html.unescape(ftfy.fix_text(p))) for p in PROMPTS]
    want = hf(cleaned, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    got = tokenize(PROMPTS, pad_token=49407)
    for prompt, a, b in zip(PROMPTS, got.ids, want, strict=True):
        assert torch.equal(a, b), prompt
    # Where cleaning changes nothing, the raw prompt gives the same ids too.
    plain = [p for p, c in zip(PROMPTS, cleaned, strict=True) if p == c]
    assert len(plain) > 10
    raw = hf(plain, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(raw, tokenize(plain, pad_token=49407).ids)


def test_layout_and_padding() -> None:
    t = tokenize(["", "a cat"], pad_token=0)
    cat = CLIPTokenizer().encode("a cat")
    assert len(cat) == 2
    assert t.ids[0, :2].tolist() == [SOT, EOT] and (t.ids[0, 2:] == 0).all()
    assert t.ids[1, :4].tolist() == [SOT, *cat, EOT] and (t.ids[1, 4:] == 0).all()
    assert t.dropped == [None, None]
    single = tokenize("a cat", pad_token=EOT)
    assert single.ids.shape == (1, 77) and (single.ids[0, 3:] == EOT).all()


def test_truncation_keeps_eot_and_reports_dropped_words() -> None:
    exact = tokenize("word " * 75, pad_token=0)
    assert exact.dropped == [None] and exact.ids[0, -1] == EOT
    t = tokenize(["Word " * 75 + "Extra", "word " * 100], pad_token=0)
    assert (t.ids[:, 0] == SOT).all() and (t.ids[:, -1] == EOT).all()
    assert t.dropped == ["Extra", " ".join(["word"] * 25)]  # the user's case is kept


def test_truncation_inside_a_word_reports_its_tail() -> None:
    oc = open_clip_module("tokenizer")
    prompt = "a " * 74 + "supercalifragilisticexpialidocious goes on"
    full = oc._tokenizer.encode(prompt)
    assert len(full) > 77  # the long word is several tokens, cut after its first
    t = tokenize(prompt, pad_token=0)
    assert t.ids[0, 1:76].tolist() == full[:75]
    assert t.dropped == [oc._tokenizer.decode(full[75:]).strip()]
    assert t.dropped[0] is not None and t.dropped[0].endswith("goes on")
    upper = tokenize(prompt.upper(), pad_token=0).dropped[0]
    assert upper is not None and upper == t.dropped[0].upper()


def test_decode_inverts_encode_on_clean_text(ours: CLIPTokenizer) -> None:
    for text in ("a cat sitting on a mat", "東京の夜景", "café crème", "🎉 party 4 u"):
        assert ours.decode(ours.encode(text)) == text


# --- a model's own vocabulary (a diffusers folder's tokenizer/) --------------------------------------------------


def _cleaned(prompts: list[str]) -> list[str]:
    # As in test_matches_transformers_pad_eot: transformers 5 skips the ftfy fix and HTML unescaping.
    return [html.unescape(html.unescape(ftfy.fix_text(p))) for p in prompts]


@pytest.mark.parametrize("layout", ["vocab.json", "tokenizer.json"])
def test_a_folders_own_vocabulary_matches_transformers(tmp_path: Path, layout: str) -> None:
    """A 1000-token vocabulary with its specials first (diffusers' fixtures' tiny tokenizer), read from the
    released folders' layout (vocab.json + merges.txt) and from what transformers 5 saves (tokenizer.json)."""
    hf = tiny_clip_tokenizer(tmp_path / "src")
    folder = tmp_path / "src"
    if layout == "tokenizer.json":
        hf.save_pretrained(tmp_path / "saved")
        folder = tmp_path / "saved"
        assert not (folder / "vocab.json").exists()
    ours = read_tokenizer_folder(folder)
    assert ours.source == str(folder / layout) and not ours.is_builtin
    assert (ours.bos_id, ours.eos_id, ours.pad_id, len(ours.vocab), ours.max_length) == (0, 2, 1, 1000, 77)
    want = hf(_cleaned(PROMPTS), padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    got = ours.tokenize(PROMPTS)
    for prompt, a, b in zip(PROMPTS, got.ids, want.input_ids, strict=True):
        assert torch.equal(a, b), prompt
    assert not torch.equal(got.ids, tokenize(PROMPTS, pad_token=1).ids)  # not the built-in vocabulary
    assert got.dropped[-1] is not None  # long prompts are cut, and say what was dropped
    assert ours.decode(ours.encode("a red circle")) == "a red circle"


def test_a_folder_of_clips_vocabulary_is_the_built_in_one(tmp_path: Path) -> None:
    hf_clip_tokenizer(tmp_path / "sd2", pad_token="!").save_pretrained(tmp_path / "saved")
    ours = read_tokenizer_folder(tmp_path / "saved")
    assert ours.is_builtin and ours.pad_id == 0  # SD2's tokenizer pads with "!"
    assert torch.equal(ours.tokenize(PROMPTS).ids, tokenize(PROMPTS, pad_token=0).ids)


def test_model_max_length_sets_the_padded_length(tmp_path: Path) -> None:
    hf = tiny_clip_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))
    ours = read_tokenizer_folder(tmp_path)
    want = hf(_cleaned(PROMPTS), padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    assert ours.max_length == 16 and torch.equal(ours.tokenize(PROMPTS).ids, want)
    assert ours.mismatch(vocab_size=1000, context_length=8, pad_token=1) is not None
    assert ours.mismatch(vocab_size=1000, context_length=77, pad_token=1) is None
    assert "embeds only 999 tokens" in (ours.mismatch(vocab_size=999, context_length=77, pad_token=1) or "")


def test_metadata_json_round_trip(tmp_path: Path) -> None:
    tiny_clip_tokenizer(tmp_path)
    ours = read_tokenizer_folder(tmp_path)
    back = tokenizer_from_json(tokenizer_to_json(ours), "model.safetensors: metadata")
    assert back.vocab == ours.vocab and (back.bos_id, back.eos_id, back.pad_id, back.max_length) == (0, 2, 1, 77)
    assert torch.equal(back.tokenize(PROMPTS).ids, ours.tokenize(PROMPTS).ids)
    with pytest.raises(TokenizerError, match=r"^model\.safetensors: metadata: not a tokenizer"):
        tokenizer_from_json('{"vocab": 3}', "model.safetensors: metadata")


BROKEN = {  # file -> content, the error naming that file
    "vocab.json": ('{"a": "zero"}', r"vocab\.json: token 'a' has id 'zero'"),
    "merges.txt": ("#version: 0.2\nq w e\n", r"merges\.txt: merge 1 is 'q w e', not two tokens"),
    "special_tokens_map.json": ('{"pad_token": "<|none|>"}', r"vocab\.json: the pad token '<\|none\|>' is not in"),
    "tokenizer_config.json": ('{"model_max_length": "long"}', r"tokenizer_config\.json: model_max_length is 'long'"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_tokenizer_file_is_named(tmp_path: Path, name: str) -> None:
    tiny_clip_tokenizer(tmp_path)
    text, message = BROKEN[name]
    (tmp_path / name).write_text(text)
    with pytest.raises(TokenizerError, match=message) as err:
        read_tokenizer_folder(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_a_merge_outside_the_vocabulary_is_refused(tmp_path: Path) -> None:
    tiny_clip_tokenizer(tmp_path)
    with (tmp_path / "merges.txt").open("a") as f:
        f.write("zz qq\n")
    with pytest.raises(TokenizerError, match=r"merges\.txt: merge 486 \(zz qq\) makes or uses 'zz'"):
        read_tokenizer_folder(tmp_path)

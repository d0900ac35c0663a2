"""Textual-inversion embeddings: the files people ship, and adding them to a text encoder and its tokenizer.

Files (the format is read from the bytes; torch pickles go through our safe unpickler):

- A1111 ``.pt``: ``{"string_to_param": {"*": (n, D)}, "string_to_token": ..., "name": ..., "step": ...}``; the
  original textual_inversion code pickled ``string_to_param`` as an ``nn.ParameterDict``, read here from its
  ``_parameters`` as A1111 does;
- ``.safetensors`` from A1111 and other trainers: ``{"emb_params": (n, D)}``, or any single tensor;
- diffusers' ``learned_embeds.safetensors`` / ``.bin``: ``{token: (D,) or (n, D)}``;
- a bare tensor saved with ``torch.save``.

The trigger word is the caller's, else a diffusers file's own token, else the file's stem (A1111 names an
embedding after its file). Using one adds its n vectors as new rows of the token-embedding table (a new table: the
loaded one is kept and put back by :meth:`AddedEmbeddings.remove`), and a tokenizer copy that reads the trigger as
those n ids, as diffusers' ``load_textual_inversion`` adds ``<name>``, ``<name>_1``, ... and expands the prompt.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn

from stablekit.config import TextConfig
from stablekit.models.clip import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, TextEncoder
from stablekit.text.tokenizer import CLIPTokenizer
from stablekit.weights.load import CheckpointError, read_checkpoint, sniff
from stablekit.weights.pickle_safe import Placeholder, _resolve, load_legacy, load_zip

# More vectors than one 75-token prompt chunk holds cannot be a real embedding.
MAX_VECTORS = 75


class EmbeddingError(ValueError):
    """An embedding file that cannot be read or used; the message names the file."""


@dataclass(frozen=True, eq=False)  # compared by identity: tensors have no single truth value
class Embedding:
    name: str  # the trigger word
    vectors: Tensor  # (n, D)
    source: str = ""  # the file, for messages


def _torch_object(path: str, fmt: str) -> Any:
    try:
        return (load_zip(path) if fmt == "torch-zip" else load_legacy(path)).obj
    except Exception as e:  # anything a malformed or hostile stream raises while we parse it
        raise CheckpointError(f"{path}: cannot read torch file: {type(e).__name__}: {str(e)[:200]}") from e


def _parameter_dict(obj: Any) -> Any:
    # An nn.ParameterDict unpickles as an inert placeholder whose state holds the module's __dict__.
    if isinstance(obj, Placeholder) and isinstance(obj.state, dict):
        return _resolve(obj.state.get("_parameters"))
    return obj


def _tensor_of(obj: Any, where: str) -> tuple[str | None, Tensor]:
    """(the file's own token or None, the vectors) of an unpickled or safetensors object."""
    if isinstance(obj, Tensor):
        return None, obj
    if not isinstance(obj, dict):
        raise EmbeddingError(f"{where}: holds a {type(obj).__name__}, not an embedding")
    if "string_to_param" in obj:
        params = _parameter_dict(obj["string_to_param"])
        if not isinstance(params, dict) or len(params) != 1 or not isinstance(next(iter(params.values())), Tensor):
            raise EmbeddingError(f"{where}: string_to_param is not one tensor (as A1111 writes '*')")
        return None, next(iter(params.values()))
    if "clip_l" in obj or "clip_g" in obj:
        raise EmbeddingError(f"{where}: an SDXL embedding (clip_l/clip_g), not for a Stable Diffusion 1/2 model")
    if len(obj) == 1 and isinstance(next(iter(obj.values())), Tensor):
        key = next(iter(obj))
        return (None if key == "emb_params" else str(key)), obj[key]
    names = ", ".join(str(k) for k in list(obj)[:5])
    raise EmbeddingError(f"{where}: {len(obj)} entries ({names}), not a textual-inversion embedding")


def read_embedding(path: str | os.PathLike[str], *, token: str | None = None) -> Embedding:
    """The embedding in ``path``, triggered by ``token`` (else the file's own token, else the file's stem)."""
    path = os.fspath(path)
    fmt = sniff(path)
    if fmt == "safetensors":
        tensors = read_checkpoint(path).tensors
        assert tensors is not None
        obj: Any = tensors
    else:
        obj = _torch_object(path, fmt)
    own, vectors = _tensor_of(obj, path)
    name = token if token is not None else own if own is not None else Path(path).stem
    if not name.strip():
        raise EmbeddingError(f"{path}: the trigger word is empty")
    if vectors.dim() == 1:
        vectors = vectors[None]  # (D,) -> (1, D)
    if vectors.dim() != 2 or not vectors.is_floating_point() or not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise EmbeddingError(
            f"{path}: vectors of shape {tuple(vectors.shape)} and {vectors.dtype}; an embedding is (n, width) floats "
            f"with 1 <= n <= {MAX_VECTORS}"
        )
    if not torch.isfinite(vectors).all():
        raise EmbeddingError(f"{path}: the vectors hold NaN or infinite values")
    return Embedding(name, vectors, path)


def check_width(embedding: Embedding, config: TextConfig) -> None:
    """Raises :class:`EmbeddingError` unless the vectors are as wide as the text encoder's token embeddings."""
    width = embedding.vectors.shape[1]
    if width != config.width:
        raise EmbeddingError(
            f"{embedding.source or embedding.name}: vectors of width {width} are for another text encoder "
            f"(SD1: 768, SD2: 1024); this model's is {config.width}"
        )


def token_embedding(encoder: TextEncoder) -> nn.Embedding:
    """The token-embedding table of either text-encoder layout."""
    if isinstance(encoder, FrozenCLIPEmbedder):
        return encoder.transformer.text_model.embeddings.token_embedding
    if isinstance(encoder, FrozenOpenCLIPEmbedder):
        return encoder.model.token_embedding
    raise TypeError(f"no token embedding known for {type(encoder).__name__}")


class AddedEmbeddings:
    """Embeddings added to ``encoder``'s token table; ``tokenizer`` reads their triggers. :meth:`remove` (or leaving
    the ``with`` block) puts the encoder's own table back; the caller's tokenizer was never changed."""

    def __init__(self, encoder: TextEncoder, tokenizer: CLIPTokenizer, embeddings: Sequence[Embedding]) -> None:
        table = token_embedding(encoder)
        known = tokenizer.added_tokens
        rows = table.num_embeddings
        ids: dict[str, tuple[int, ...]] = {}
        vectors: list[Tensor] = []
        for emb in embeddings:
            check_width(emb, encoder.config)
            if emb.name.lower() in known or emb.name.lower() in ids:
                raise EmbeddingError(f"{emb.source or emb.name}: the trigger {emb.name!r} is already added")
            n = emb.vectors.shape[0]
            ids[emb.name.lower()] = tuple(range(rows, rows + n))
            rows += n
            vectors.append(emb.vectors)
        self.encoder, self._table = encoder, table
        self._weight, self._config = table.weight, encoder.config
        old = table.weight.detach()
        new = torch.cat([old, *(v.to(old) for v in vectors)])  # (V + Σn, D)
        table.weight = nn.Parameter(new, requires_grad=old.requires_grad)
        table.num_embeddings = new.shape[0]
        # The encoder refuses ids past its config's vocabulary: the new rows are part of it while added.
        encoder.config = replace(encoder.config, vocab_size=new.shape[0])
        self._added = table.weight
        self.ids = ids  # trigger (lower-cased, as the tokenizer matches it) -> its rows
        self.tokenizer = tokenizer.with_added_tokens(ids)

    @property
    def added(self) -> bool:
        return self._table.weight is self._added

    def remove(self) -> None:
        """Put the encoder's own table back (nothing to do when already removed). Embeddings added later on top of
        these must be removed first."""
        if self._table.weight is self._weight:
            return
        if not self.added:
            raise EmbeddingError("embeddings added after these are still in the text encoder: remove them first")
        now = self._table.weight
        if (now.device, now.dtype) != (self._weight.device, self._weight.dtype):
            self._weight.data = self._weight.data.to(now.device, now.dtype)  # the model moved while they were added
        self._table.weight = self._weight
        self._table.num_embeddings = self._weight.shape[0]
        self.encoder.config = self._config

    def __enter__(self) -> AddedEmbeddings:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.remove()


def add_embeddings(encoder: TextEncoder, tokenizer: CLIPTokenizer, embeddings: Sequence[Embedding]) -> AddedEmbeddings:
    """Add ``embeddings`` to ``encoder`` (new rows of its token table) and return the handle holding the tokenizer
    that reads their triggers; see :class:`AddedEmbeddings`."""
    return AddedEmbeddings(encoder, tokenizer, embeddings)

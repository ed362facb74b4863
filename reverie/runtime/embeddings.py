"""Sentence embeddings with all-MiniLM-L6-v2, a small BERT encoder run in MLX.

The model (sentence-transformers/all-MiniLM-L6-v2, MIT; fetched by
:mod:`reverie.runtime.fetch` as ``all-minilm-l6-v2``) is a 6-layer, 384-wide BERT. This
module reimplements HF ``BertModel`` in ``mlx.nn`` and reproduces sentence-transformers'
pipeline for that model:

* tokenisation with the model's ``tokenizer.json`` (lower-casing WordPiece), truncated at
  256 tokens: sentence-transformers' ``max_seq_length`` for this model is 256
  (``sentence_bert_config.json``), although the ``tokenizer.json`` itself says 128;
* mean pooling of the last hidden states over non-padding tokens
  (``1_Pooling/config.json``: ``pooling_mode_mean_tokens: true``, all other modes false);
* L2 normalisation (the model's ``modules.json`` ends with a ``Normalize`` module).

Outputs agree with sentence-transformers to cosine >= 0.999 (``tests/test_embeddings.py``).

:class:`MiniLMEmbeddingFunction` wraps an :class:`Embedder` as a ChromaDB embedding
function: Chroma's default one downloads an ONNX model on first use, which fails offline.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from reverie.runtime import blas as _blas  # noqa: F401  (``import reverie`` preloads OpenBLAS)

import mlx.core as mx  # noqa: E402  (after OpenBLAS)
import mlx.nn as nn  # noqa: E402

from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space  # noqa: E402
from chromadb.utils.embedding_functions import register_embedding_function  # noqa: E402

MAX_SEQ_LENGTH = 256
"""Tokens per text, [CLS] and [SEP] included; longer texts are truncated (as in
sentence-transformers, whose ``max_seq_length`` for all-MiniLM-L6-v2 is 256)."""

# Tensors in the checkpoint that the encoder does not use: a non-parameter buffer of HF
# BertEmbeddings and the [CLS] pooler (mean pooling ignores it). Anything else missing or
# extra makes loading fail.
_UNUSED_PREFIXES = ("embeddings.position_ids", "pooler.")


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------


@dataclass
class BertArgs:
    """Hyper-parameters of a BERT encoder, read from an HF ``config.json``."""

    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    vocab_size: int = 30522
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BertArgs:
        """Build from a parsed ``config.json``.

        Raises:
            ValueError: the config is not a BERT with absolute positions and GELU, or a
                required key is missing.
        """
        if config.get("model_type", "bert") != "bert":
            raise ValueError(f"not a BERT config: model_type={config.get('model_type')!r}")
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {config.get('hidden_act')!r}")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        try:
            return cls(
                hidden_size=int(config["hidden_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=int(config["num_attention_heads"]),
                intermediate_size=int(config["intermediate_size"]),
                max_position_embeddings=int(config["max_position_embeddings"]),
                type_vocab_size=int(config.get("type_vocab_size", 2)),
                vocab_size=int(config["vocab_size"]),
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks {e.args[0]!r}") from None


# erf(x) for float32 as x * P(x^2) / Q(x^2) on [-4, 4] (erf is +-1 in float32 beyond): the
# rational approximation of Eigen's and XLA's float32 erf. Max abs error 4.2e-7 against
# math.erf on float32 inputs (mx.erf: 4.5e-7). Built from multiply/add only because MLX's
# CPU transcendentals are scalar: mx.erf on a 832x1536 float32 activation takes ~35 ms on 2
# cores, this ~4 ms, and GELU was 2/3 of the encoder's time.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


def erf(x: mx.array) -> mx.array:
    """Float32 erf, elementwise (max abs error 4.2e-7); same shape as ``x``."""
    x = mx.clip(x, -4.0, 4.0)
    x2 = x * x
    p = mx.array(_ERF_P[0], dtype=x.dtype)
    for c in _ERF_P[1:]:
        p = p * x2 + c
    q = mx.array(_ERF_Q[0], dtype=x.dtype)
    for c in _ERF_Q[1:]:
        q = q * x2 + c
    return x * p / q


def gelu_erf(x: mx.array) -> mx.array:
    """BERT's exact GELU, ``x * (1 + erf(x / sqrt(2))) / 2`` (not the tanh approximation)."""
    return 0.5 * x * (1.0 + erf(x * 0.7071067811865476))


class BertEmbeddings(nn.Module):
    def __init__(self, args: BertArgs):
        super().__init__()
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.position_embeddings = nn.Embedding(args.max_position_embeddings, args.hidden_size)
        self.token_type_embeddings = nn.Embedding(args.type_vocab_size, args.hidden_size)
        self.LayerNorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, input_ids: mx.array, token_type_ids: mx.array) -> mx.array:
        positions = mx.arange(input_ids.shape[1])
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
             + self.token_type_embeddings(token_type_ids))
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, args: BertArgs):
        super().__init__()
        if args.hidden_size % args.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        self.n_heads = args.num_attention_heads
        self.head_dim = args.hidden_size // args.num_attention_heads
        self.query = nn.Linear(args.hidden_size, args.hidden_size)
        self.key = nn.Linear(args.hidden_size, args.hidden_size)
        self.value = nn.Linear(args.hidden_size, args.hidden_size)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        b, l, d = x.shape

        def heads(t: mx.array) -> mx.array:
            return t.reshape(b, l, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5,
                                                 mask=mask)
        return o.transpose(0, 2, 1, 3).reshape(b, l, d)


class BertSelfOutput(nn.Module):
    def __init__(self, args: BertArgs):
        super().__init__()
        self.dense = nn.Linear(args.hidden_size, args.hidden_size)
        self.LayerNorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, h: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, args: BertArgs):
        super().__init__()
        self.self = BertSelfAttention(args)  # named as in HF checkpoints
        self.output = BertSelfOutput(args)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, args: BertArgs):
        super().__init__()
        self.dense = nn.Linear(args.hidden_size, args.intermediate_size)

    def __call__(self, x: mx.array) -> mx.array:
        return gelu_erf(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, args: BertArgs):
        super().__init__()
        self.dense = nn.Linear(args.intermediate_size, args.hidden_size)
        self.LayerNorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, h: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(h) + residual)


class BertLayer(nn.Module):
    def __init__(self, args: BertArgs):
        super().__init__()
        self.attention = BertAttention(args)
        self.intermediate = BertIntermediate(args)
        self.output = BertOutput(args)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, args: BertArgs):
        super().__init__()
        self.layer = [BertLayer(args) for _ in range(args.num_hidden_layers)]

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertModel(nn.Module):
    """HF ``BertModel`` without the pooler: returns the last hidden states."""

    def __init__(self, args: BertArgs):
        super().__init__()
        self.args = args
        self.embeddings = BertEmbeddings(args)
        self.encoder = BertEncoder(args)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array) -> mx.array:
        """Encode a padded batch.

        Args:
            input_ids: int32, shape (batch, seq).
            attention_mask: shape (batch, seq), 1 for real tokens and 0 for padding.

        Returns:
            float32 hidden states, shape (batch, seq, hidden_size). Rows at padded positions
            are computed but meaningless.
        """
        x = self.embeddings(input_ids, mx.zeros_like(input_ids))
        # Additive mask on padded keys, broadcast over heads and queries: (batch, 1, 1, seq).
        # Every row has a real [CLS] key, so no softmax row is entirely -inf.
        additive = mx.where(attention_mask[:, None, None, :] > 0, 0.0, -mx.inf)
        return self.encoder(x, additive.astype(x.dtype))


def pool_and_normalize(hidden: mx.array, attention_mask: mx.array) -> mx.array:
    """Mean over non-pad tokens, then L2 normalisation (sentence-transformers' recipe).

    Args:
        hidden: (batch, seq, dim) hidden states.
        attention_mask: (batch, seq), 1 for real tokens, 0 for padding.

    Returns:
        (batch, dim) unit-length vectors.
    """
    m = attention_mask[..., None].astype(hidden.dtype)
    mean = (hidden * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1e-9)
    norm = mx.sqrt((mean * mean).sum(axis=-1, keepdims=True))
    return mean / mx.maximum(norm, 1e-12)


# --------------------------------------------------------------------------------------
# Embedder
# --------------------------------------------------------------------------------------


class Embedder:
    """Embeds texts into unit-length 384-d float32 vectors (cosine = dot product).

    Build with :meth:`Embedder.load`. Not meant to be shared between threads without a lock
    (:class:`MiniLMEmbeddingFunction` takes one).
    """

    def __init__(self, model: BertModel, tokenizer: Tokenizer, model_dir: Path | None = None,
                 max_length: int = MAX_SEQ_LENGTH):
        self.model = model
        self.model_dir = model_dir
        self.max_length = min(max_length, model.args.max_position_embeddings)
        self.dim = model.args.hidden_size
        tokenizer.no_padding()  # we pad per batch, after sorting by length
        tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer = tokenizer
        self._pad_id = tokenizer.token_to_id("[PAD]") or 0

    def _forward(self, ids: mx.array, mask: mx.array) -> mx.array:
        # Not mx.compile'd: on CPU it was no faster (the encoder is matmul-bound once GELU
        # avoids mx.erf) and each new (batch, seq) shape cost ~2 s of compilation.
        return pool_and_normalize(self.model(ids, mask), mask)

    @classmethod
    def load(cls, model_dir: Path | str) -> Embedder:
        """Load from a folder holding ``config.json``, ``tokenizer.json`` and
        ``model.safetensors`` (an HF BERT checkpoint, with or without a ``bert.`` prefix).

        Raises:
            FileNotFoundError: one of the three files is missing.
            ValueError: the config is not a supported BERT, or the weights do not match it
                (a missing, extra or mis-shaped tensor).
        """
        model_dir = Path(model_dir)
        for name in ("config.json", "tokenizer.json", "model.safetensors"):
            if not (model_dir / name).is_file():
                raise FileNotFoundError(f"{model_dir / name} not found")
        args = BertArgs.from_config(json.loads((model_dir / "config.json").read_text()))
        model = BertModel(args)
        weights = mx.load(str(model_dir / "model.safetensors"))
        weights = {k.removeprefix("bert."): v for k, v in weights.items()}
        weights = {k: v.astype(mx.float32) for k, v in weights.items()
                   if not k.startswith(_UNUSED_PREFIXES)}
        model.load_weights(list(weights.items()), strict=True)
        model.eval()
        mx.eval(model.parameters())
        return cls(model, Tokenizer.from_file(str(model_dir / "tokenizer.json")), model_dir)

    def embed(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embed texts.

        Texts are sorted by token count before batching (so a batch pads little) and the
        result is returned in the input order. Texts over 256 tokens are truncated.

        Args:
            texts: the texts; an empty string is allowed.
            batch_size: texts per forward pass (>= 1).

        Returns:
            float32 array of shape (len(texts), 384), rows of L2 norm 1; shape (0, 384) for
            an empty list.

        Raises:
            TypeError: an item of ``texts`` is not a ``str``.
            ValueError: ``batch_size`` < 1.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be str, got {type(t).__name__}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        lengths = np.array([len(e.ids) for e in encodings])
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            seq = int(lengths[idx].max())
            ids = np.full((len(idx), seq), self._pad_id, dtype=np.int32)
            mask = np.zeros((len(idx), seq), dtype=np.int32)
            for row, i in enumerate(idx):
                n = lengths[i]
                ids[row, :n] = encodings[i].ids
                mask[row, :n] = 1
            vecs = self._forward(mx.array(ids), mx.array(mask))
            out[idx] = np.array(vecs, dtype=np.float32)
        return out


# --------------------------------------------------------------------------------------
# ChromaDB
# --------------------------------------------------------------------------------------

_cache: dict[Path, Embedder] = {}
_cache_lock = threading.Lock()


def _shared_embedder(model_dir: Path) -> Embedder:
    key = model_dir.resolve()
    with _cache_lock:
        if key not in _cache:
            _cache[key] = Embedder.load(key)
        return _cache[key]


@register_embedding_function
class MiniLMEmbeddingFunction(EmbeddingFunction[Documents]):
    """ChromaDB embedding function backed by an :class:`Embedder`.

    Pass it as ``embedding_function=`` to ``create_collection`` / ``get_collection`` /
    ``get_or_create_collection``. Chroma persists ``{"model_dir": ...}`` in the collection's
    config under the name ``"reverie_minilm"`` and, on re-opening, rebuilds the function
    with :meth:`build_from_config` (the model is then loaded lazily, once per folder and
    process). The class is registered with Chroma when this module is imported.

    Args:
        embedder: a loaded :class:`Embedder`, or the model folder to load one from on first
            use.
    """

    def __init__(self, embedder: Embedder | Path | str):
        if isinstance(embedder, Embedder):
            if embedder.model_dir is None:
                raise ValueError("the Embedder must come from Embedder.load(model_dir)")
            self._embedder: Embedder | None = embedder
            self._model_dir = Path(embedder.model_dir)
        else:
            self._embedder = None
            self._model_dir = Path(embedder)
        self._lock = threading.Lock()

    def __call__(self, input: Documents) -> Embeddings:
        """Embed documents: a list of 384-d float32 unit vectors, one per document."""
        with self._lock:
            if self._embedder is None:
                self._embedder = _shared_embedder(self._model_dir)
            vecs = self._embedder.embed(list(input))
        return list(vecs)

    @staticmethod
    def name() -> str:
        return "reverie_minilm"

    def default_space(self) -> Space:
        return "cosine"  # unit vectors: cosine ranks like l2 and ip

    def supported_spaces(self) -> list[Space]:
        return ["cosine", "l2", "ip"]

    def is_legacy(self) -> bool:
        return False  # the default would build (and so load) a second instance to check

    def get_config(self) -> dict[str, Any]:
        return {"model_dir": str(self._model_dir.resolve())}

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MiniLMEmbeddingFunction:
        return MiniLMEmbeddingFunction(Path(config["model_dir"]))

    @staticmethod
    def validate_config(config: dict[str, Any]) -> None:
        if not isinstance(config.get("model_dir"), str):
            raise ValueError(f"config needs a 'model_dir' string, got {config!r}")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, MiniLMEmbeddingFunction)
                and self._model_dir.resolve() == other._model_dir.resolve())

    def __hash__(self) -> int:
        return hash(self._model_dir.resolve())

"""Tiny, deterministic, randomly initialised models for tests.

Every builder writes a folder that loads through the REAL loading code (SentenceTransformer,
CrossEncoder, SparseEncoder, FlagModel, FlagReranker, BGEM3FlagModel), so tests exercise the
same paths as production, just with ~100 KB models that load in well under a second.
Outputs are meaningless but reproducible: the same seed gives byte-identical weights.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

# Small on purpose: the vocabulary drives the embedding matrix size (vocab x hidden).
TEST_WORDS: list[str] = sorted(set("""
the a an and or of to in on for with by from at as is are was be it this that these those
not no yes how what when where which who why can do does use using used set get run make
new old one two three all any each more most other some such than then there their them
you your we our they he she his her its if else also only into over under about after before
install installing installation configure configuration setup update upgrade remove delete
gpu cpu cuda memory device driver server client network cluster node nodes disk file files
embedding embeddings vector vectors dense sparse model models encoder retrieval search index
chunk chunks query queries document documents text token tokens batch rerank reranker
score scores rank ranking fusion weight weights dimension collection pipeline data
error errors log logs debug test tests python package version linux windows docker
kubernetes database cache config user users guide start stop restart service api key
""".split()))

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_SINGLE_CHARS = list(string.ascii_lowercase + string.digits + string.punctuation)

# One BERT shape for all BERT-family tiny models; max_position_embeddings bounds max_length.
TINY_MAX_POSITIONS = 64
TINY_MAX_LENGTH = 48  # what the tiny registry asks for: below TINY_MAX_POSITIONS, with room for specials


def _bert_vocab() -> list[str]:
    vocab = list(SPECIAL_TOKENS)
    for tok in [*TEST_WORDS, *_SINGLE_CHARS, *("##" + c for c in _SINGLE_CHARS)]:
        if tok not in vocab:
            vocab.append(tok)
    return vocab


def _bert_config(vocab_size: int, hidden: int = 32, **extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64 if hidden <= 32 else 2 * hidden,
        max_position_embeddings=TINY_MAX_POSITIONS,
        pad_token_id=0,
        **extra,
    )


def build_bert_tokenizer(dir: Path) -> Path:
    """Hand-written WordPiece vocab re-saved through BertTokenizerFast (tokenizer.json etc.)."""
    from transformers import BertTokenizerFast

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "vocab.txt").write_text("\n".join(_bert_vocab()) + "\n", encoding="utf-8")
    # from_pretrained(dir), not BertTokenizerFast(vocab_file=...): transformers 5 ignores vocab_file.
    tok = BertTokenizerFast.from_pretrained(str(dir), do_lower_case=True, model_max_length=TINY_MAX_POSITIONS)
    tok.save_pretrained(str(dir))
    return dir


def _tokenizer_vocab_size(dir: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(dir)))


def build_sentence_transformer(dir: Path, seed: int = 0, hidden: int = 32) -> Path:
    """BertModel + mean Pooling + Normalize as a SentenceTransformer folder; output dim = hidden."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertModel

    dir = Path(dir)
    build_bert_tokenizer(dir)
    torch.manual_seed(seed)
    BertModel(_bert_config(_tokenizer_vocab_size(dir), hidden=hidden)).save_pretrained(str(dir))
    word = Transformer(str(dir), max_seq_length=TINY_MAX_LENGTH)
    pooling = Pooling(word.get_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[word, pooling, Normalize()], device="cpu")
    model.save(str(dir))
    return dir


def build_cross_encoder(dir: Path, seed: int = 0) -> Path:
    """BertForSequenceClassification(num_labels=1): loads as CrossEncoder and FlagReranker."""
    from transformers import BertForSequenceClassification

    dir = Path(dir)
    build_bert_tokenizer(dir)
    torch.manual_seed(seed)
    # Wider init than BERT's 0.02: otherwise every pair scores about the same and ranking tests
    # would compare near-ties.
    config = _bert_config(_tokenizer_vocab_size(dir), num_labels=1, initializer_range=0.5)
    BertForSequenceClassification(config).save_pretrained(str(dir))
    return dir


def build_splade(dir: Path, seed: int = 0) -> Path:
    """BertForMaskedLM saved as a sentence_transformers SparseEncoder (MLM transformer + SPLADE max pooling)."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import SpladePooling, Transformer
    from transformers import BertForMaskedLM

    dir = Path(dir)
    build_bert_tokenizer(dir)
    torch.manual_seed(seed)
    BertForMaskedLM(_bert_config(_tokenizer_vocab_size(dir))).save_pretrained(str(dir))
    mlm = Transformer(str(dir), transformer_task="fill-mask", max_seq_length=TINY_MAX_LENGTH)
    model = SparseEncoder(modules=[mlm, SpladePooling(pooling_strategy="max")], device="cpu")
    model.save(str(dir))
    return dir


def _build_unigram_tokenizer(dir: Path) -> int:
    """XLM-R style SentencePiece-Unigram tokenizer built with `tokenizers`; returns vocab size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import XLMRobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in specials]
    seen = set(specials)
    # Whole words (with the "▁" word-start marker) score higher than single characters, so
    # known words stay one piece and anything else falls back to characters.
    for w in TEST_WORDS:
        p = "\u2581" + w
        if p not in seen:
            pieces.append((p, -2.0))
            seen.add(p)
    for c in ["\u2581", *_SINGLE_CHARS, *string.ascii_uppercase]:
        for p in (c, "\u2581" + c) if c != "\u2581" else (c,):
            if p not in seen:
                pieces.append((p, -8.0))
                seen.add(p)
    pieces.append(("<mask>", 0.0))
    tok = Tokenizer(models.Unigram(pieces, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    fast = XLMRobertaTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        model_max_length=TINY_MAX_POSITIONS - 2,
    )
    fast.save_pretrained(str(dir))
    return len(pieces)


def build_bge_m3(dir: Path, seed: int = 0) -> Path:
    """Tiny XLMRoberta + Unigram tokenizer + fixed colbert/sparse heads: BGEM3FlagModel(dir) loads deterministically."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    vocab_size = _build_unigram_tokenizer(dir)
    hidden = 32
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        # XLM-R positions start at pad_token_id + 1, hence the +2.
        max_position_embeddings=TINY_MAX_POSITIONS + 2,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        type_vocab_size=1,
    )
    XLMRobertaModel(config).save_pretrained(str(dir))
    # Without these two files BGEM3FlagModel draws fresh random heads on every load.
    torch.save(torch.nn.Linear(hidden, hidden).state_dict(), dir / "colbert_linear.pt")
    sparse_head = torch.nn.Linear(hidden, 1)
    # Positive bias: a random head otherwise zeroes (ReLU) every token of some short texts.
    torch.nn.init.constant_(sparse_head.bias, 0.3)
    torch.save(sparse_head.state_dict(), dir / "sparse_linear.pt")
    return dir


# name -> (builder, kwargs); dims: tiny-a 32, tiny-b 48 so fusion of unequal widths is exercised.
TINY_DENSE_DIMS = {"tiny-a": 32, "tiny-b": 48}


def build_all(models_dir: Path) -> Path:
    """Every tiny model under models_dir/<name>; what write_tiny_registry points at."""
    models_dir = Path(models_dir)
    for i, (name, dim) in enumerate(TINY_DENSE_DIMS.items()):
        build_sentence_transformer(models_dir / name, seed=i, hidden=dim)
    build_splade(models_dir / "tiny-splade", seed=10)
    build_cross_encoder(models_dir / "tiny-reranker", seed=20)
    build_bge_m3(models_dir / "tiny-bge-m3", seed=30)
    return models_dir


def write_tiny_registry(
    dir: Path,
    models_dir: Path,
    *,
    dense=("tiny-a", "tiny-b"),
    with_sparse: bool = True,
    with_rerank: bool = True,
    rerank_sources=None,
    fusion: str = "concat",
) -> Path:
    """Write dir/models.toml (format of rag_clean/models.toml) with "path:" sources into models_dir.

    rerank_sources: optional list of sources for the reranker, first = primary, rest = fallbacks
    (e.g. ["BAAI/not-available", "path:/.../tiny-reranker"] to exercise the fallback path).
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    models_dir = Path(models_dir).resolve()
    lines = ["[fusion]", f"method = {json.dumps(fusion)}", ""]
    weights = [0.8, 0.2] + [0.5] * max(0, len(dense) - 2)
    for name, weight in zip(dense, weights):
        dim = TINY_DENSE_DIMS.get(name, 32)
        lines += [
            "[[models]]",
            f"name = {json.dumps(name)}",
            'role = "dense"',
            'backend = "sentence-transformers"',
            f"source = {json.dumps('path:' + str(models_dir / name))}",
            f"dim = {dim}",
            'pooling = "mean"',
            f"max_length = {TINY_MAX_LENGTH}",
            'dtype = "auto"',
            f"weight = {weight}",
            "",
        ]
    if with_sparse:
        lines += [
            "[[models]]",
            'name = "tiny-splade"',
            'role = "sparse"',
            'backend = "sentence-transformers"',
            f"source = {json.dumps('path:' + str(models_dir / 'tiny-splade'))}",
            f"max_length = {TINY_MAX_LENGTH}",
            "top_k = 32",
            "",
        ]
    if with_rerank:
        sources = list(rerank_sources or ["path:" + str(models_dir / "tiny-reranker")])
        lines += [
            "[[models]]",
            'name = "tiny-reranker"',
            'role = "rerank"',
            'backend = "sentence-transformers"',
            f"source = {json.dumps(sources[0])}",
            f"max_length = {TINY_MAX_LENGTH}",
        ]
        if len(sources) > 1:
            lines.append(f"fallbacks = {json.dumps(sources[1:])}")
        lines.append("")
    path = dir / "models.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path

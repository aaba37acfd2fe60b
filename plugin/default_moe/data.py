"""The shipped corpus, its tokenizer, and a stateless batch sampler for the main job.

Corpus: the reStructuredText sources of the Python 3.11 documentation (Debian `python3.11-doc`,
PSF licence, see data/LICENSE-PSF.txt and launch/build_corpus.py for how it was cut), 8.2 M
characters shipped xz-compressed. Tokenizer: a byte-level BPE with 4096 tokens trained on the
first 95% of it (`tokenizers` JSON). The last 5% of the tokens is the validation split.

Other data: `load_tokens(path)` also takes a user's text file, a directory of `.txt`/`.md`/`.rst`
files, or a pre-tokenized binary of little-endian uint16/uint32 ids (`.bin`, with `--token-dtype`).

Tokenized data is cached under `$DEFAULT_MOE_CACHE` (default `~/.cache/default-moe`), keyed by a
hash of the text and the tokenizer, so it is made once.
"""

from __future__ import annotations

import hashlib
import lzma
import os
from importlib import resources
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

SHIPPED = "shipped"
TOKENIZER_FILE = "pydocs_bpe4096.json"
CORPUS_FILE = "pydocs.txt.xz"


def data_path(name: str) -> Path:
    return Path(str(resources.files("default_moe") / "data" / name))


def load_tokenizer(path: Optional[str] = None):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path or data_path(TOKENIZER_FILE)))


def _read_text(source: str) -> str:
    if source == SHIPPED:
        with lzma.open(data_path(CORPUS_FILE), "rt", encoding="utf-8") as f:
            return f.read()
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in {".txt", ".md", ".rst"})
        if not files:
            raise ValueError(f"--data {source}: the directory has no .txt, .md or .rst files")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if not p.exists():
        raise ValueError(f"--data {source}: no such file or directory (or use 'shipped')")
    return p.read_text(encoding="utf-8", errors="replace")


def cache_dir() -> Path:
    d = Path(os.environ.get("DEFAULT_MOE_CACHE", Path.home() / ".cache" / "default-moe"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def load_tokens(source: str = SHIPPED, tokenizer_path: Optional[str] = None, token_dtype: str = "uint16") -> np.ndarray:
    """All token ids of `source` as a 1-D numpy array (memory-mapped from the cache)."""
    if source.endswith(".bin"):
        if token_dtype not in ("uint16", "uint32"):
            raise ValueError(f"--token-dtype must be 'uint16' or 'uint32', got {token_dtype!r}")
        return np.memmap(source, dtype=np.dtype(token_dtype).newbyteorder("<"), mode="r")
    tok_path = str(tokenizer_path or data_path(TOKENIZER_FILE))
    text = _read_text(source)
    key = hashlib.sha256(text.encode() + Path(tok_path).read_bytes()).hexdigest()[:20]
    cached = cache_dir() / f"tokens-{key}.npy"
    if not cached.exists():
        tok = load_tokenizer(tok_path)
        # Chunked so the Rust tokenizer can use its threads; boundaries fall on blank lines.
        chunks = text.split("\n\n")
        ids = [i for enc in tok.encode_batch(chunks) for i in enc.ids + tok.encode("\n\n").ids]
        dtype = np.uint16 if tok.get_vocab_size() <= 65536 else np.uint32
        tmp = cached.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, np.asarray(ids, dtype=dtype))
        os.replace(tmp, cached)
    try:
        # Never a pickle: the cache holds plain integer arrays only.
        return np.load(cached, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise ValueError(
            f"token cache {cached} is not a plain integer array ({e}); it is refused, never unpickled: delete it to re-tokenise"
        ) from None


def split_train_val(tokens: np.ndarray, val_fraction: float = 0.05) -> Tuple[np.ndarray, np.ndarray]:
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def sample_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int, rank: int, micro: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random windows, a pure function of (seed, step, rank, micro): a resumed run sees exactly
    the batches the uninterrupted one would have.

    Returns:
        (inputs [B, S], targets [B, S]) as int64.
    """
    if len(tokens) <= seq_len + 1:
        raise ValueError(f"the data has {len(tokens)} tokens, fewer than seq_len + 2 = {seq_len + 2}")
    g = np.random.default_rng([seed, step, rank, micro])
    starts = g.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    window = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(window)
    return t[:, :-1], t[:, 1:]

"""Builds the corpus and tokenizer shipped in plugin/default_moe/data/ (run once by a maintainer;
users never need it). Source: the reStructuredText sources of the Python 3.11 documentation from
Debian's `python3.11-doc` package (PSF licence), which this script downloads with apt.

    python launch/build_corpus.py            # writes pydocs.txt.xz, pydocs_bpe4096.json, LICENSE-PSF.txt

Cut: the sections tutorial, howto, faq, reference, library, using, extending, installing (the
c-api, distutils and whatsnew sections are left out: mostly symbol lists and changelogs). Files in
sorted path order, each preceded by a `\\n\\n=== path ===\\n\\n` line; nothing else is changed.
The tokenizer is a byte-level BPE with 4096 tokens trained on the first 95% of that text.
"""

from __future__ import annotations

import glob
import lzma
import os
import subprocess
import tempfile
from pathlib import Path

SECTIONS = ["tutorial", "howto", "faq", "reference", "library", "using", "extending", "installing"]
OUT = Path(__file__).resolve().parents[1] / "plugin" / "default_moe" / "data"
VOCAB = 4096


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "python3.11-doc"], cwd=tmp, check=True)
        deb = glob.glob(os.path.join(tmp, "python3.11-doc_*.deb"))[0]
        subprocess.run(["dpkg", "-x", deb, os.path.join(tmp, "x")], check=True)
        src = Path(tmp, "x/usr/share/doc/python3.11/html/_sources")
        parts = []
        for section in SECTIONS:
            for f in sorted((src / section).rglob("*.txt")):
                parts.append(f"\n\n=== {f.relative_to(src)} ===\n\n" + f.read_text(encoding="utf-8"))
        text = "".join(parts)
        (OUT / "LICENSE-PSF.txt").write_text((src / "license.rst.txt").read_text(encoding="utf-8"))
        version = os.path.basename(deb)
    OUT.mkdir(parents=True, exist_ok=True)
    with lzma.open(OUT / "pydocs.txt.xz", "wt", encoding="utf-8", preset=9) as f:
        f.write(text)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    train_text = text[: int(len(text) * 0.95)]
    tok.train_from_iterator([train_text[i : i + 100_000] for i in range(0, len(train_text), 100_000)], trainer)
    tok.save(str(OUT / f"pydocs_bpe{VOCAB}.json"))
    print(
        f"{version}: {len(text) / 1e6:.1f} M characters from {len(parts)} files, "
        f"{(OUT / 'pydocs.txt.xz').stat().st_size / 1e6:.2f} MB compressed; tokenizer vocab {tok.get_vocab_size()}"
    )


if __name__ == "__main__":
    main()

"""Builds the GPU science corpus: >= 20M tokens of technical English from Debian documentation
packages, tokenised with the shipped byte-level BPE (4096), written as xz-compressed uint16 token
ids for a GPU machine without internet (`.science/tokens.bin.xz`, git-ignored; the device tool
carries `.science`). The shipped corpus (Python 3.11 docs, 2.2M training tokens) stays what the
main job uses: at the GPU config's 8192 tokens per step it lasts ~265 steps, so minutes of GPU
training on it measure memorisation. This corpus does not repeat within a 9-run science batch.

    python launch/build_science_corpus.py [--min-tokens 20000000] [--out .science]

Sources, in this order until --min-tokens is reached: the Sphinx sources (`_sources/*.txt`) or
reStructuredText of linux-doc-6.1, python-django-doc, python-scipy-doc, python-sklearn-doc,
python-pandas-doc, python-sympy-doc, python-astropy-doc; perl-doc's POD; git-doc's AsciiDoc;
postgresql-doc-15's HTML as text. Documents are shuffled by a hash of their path (so the last 5%,
the main job's validation split, is a mix of every source, not the last package), each preceded
by `=== package/path ===`. Writes tokens.bin.xz and sources.json (packages, versions, counts).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import html.parser
import json
import lzma
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugin"))

# (package, how to read it): "sphinx" (_sources/*.txt, else *.rst), "pod", "asciidoc", "html".
PACKAGES = [
    ("linux-doc-6.1", "sphinx"),
    ("python-django-doc", "sphinx"),
    ("python-scipy-doc", "sphinx"),
    ("python-sklearn-doc", "sphinx"),
    ("python-pandas-doc", "sphinx"),
    ("python-sympy-doc", "sphinx"),
    ("python-astropy-doc", "sphinx"),
    ("perl-doc", "pod"),
    ("git-doc", "asciidoc"),
    ("postgresql-doc-15", "html"),
]


class _Text(html.parser.HTMLParser):
    """Visible text of an HTML page (script/style dropped, block elements as line breaks)."""

    BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr", "dt", "dd", "table", "section"}

    def __init__(self):
        super().__init__()
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "head"):
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "head"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)

    def text(self) -> str:
        return re.sub(r"\n\s*\n+", "\n\n", "".join(self.parts)).strip()


def _read(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        import gzip

        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def documents(root: Path, kind: str):
    """(relative path, text) of one extracted package."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())

    def strip_gz(p: Path) -> str:
        return p.name[:-3] if p.name.endswith(".gz") else p.name

    if kind == "sphinx":
        chosen = [p for p in files if "/_sources/" in str(p) and strip_gz(p).endswith(".txt")]
        if not chosen:
            chosen = [p for p in files if strip_gz(p).endswith(".rst")]
        if not chosen:  # HTML only
            kind, files = "html", files
        else:
            for p in chosen:
                yield str(p.relative_to(root)), _read(p)
            return
    if kind == "pod":
        for p in files:
            if strip_gz(p).endswith((".pod",)):
                yield str(p.relative_to(root)), _read(p)
        return
    if kind == "asciidoc":
        for p in files:
            if strip_gz(p).endswith((".txt", ".adoc")):
                yield str(p.relative_to(root)), _read(p)
        return
    for p in files:
        if strip_gz(p).endswith((".html", ".htm")):
            parser = _Text()
            parser.feed(_read(p))
            text = parser.text()
            if len(text) > 200:
                yield str(p.relative_to(root)), text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-tokens", type=int, default=20_000_000)
    ap.add_argument("--out", default=str(ROOT / ".science"))
    args = ap.parse_args(argv)
    from default_moe import data as data_mod

    tok = data_mod.load_tokenizer()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs, sources, tokens = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for package, kind in PACKAGES:
            if tokens >= args.min_tokens:
                break
            d = Path(tmp, package)
            d.mkdir()
            r = subprocess.run(["apt-get", "download", package], cwd=d, capture_output=True, text=True)
            debs = glob.glob(str(d / "*.deb"))
            if r.returncode != 0 or not debs:
                print(f"[corpus] {package}: apt-get download failed ({r.stderr.strip()[-200:]}); skipped", flush=True)
                continue
            subprocess.run(["dpkg", "-x", debs[0], str(d / "x")], check=True)
            got = list(documents(d / "x", kind))
            n = sum(len(ids) for ids in (e.ids for e in tok.encode_batch([t for _, t in got]))) if got else 0
            tokens += n
            docs += [(f"{package}/{path}", text) for path, text in got]
            sources.append(
                {"package": package, "deb": os.path.basename(debs[0]), "kind": kind, "documents": len(got), "tokens": n}
            )
            print(f"[corpus] {package}: {len(got)} documents, {n / 1e6:.2f}M tokens (total {tokens / 1e6:.1f}M)", flush=True)
            for f in (d / "x").rglob("*"):  # free the disk as we go
                if f.is_file():
                    f.unlink()
    if tokens < args.min_tokens:
        raise SystemExit(f"[corpus] only {tokens / 1e6:.1f}M tokens from {len(sources)} packages (< --min-tokens)")
    docs.sort(key=lambda d: hashlib.sha256(d[0].encode()).hexdigest())
    sep = tok.encode("\n\n").ids
    ids = []
    for enc in tok.encode_batch([f"=== {name} ===\n\n{text}" for name, text in docs]):
        ids += enc.ids + sep
    arr = np.asarray(ids, dtype="<u2")
    with lzma.open(out / "tokens.bin.xz", "wb", preset=6) as f:
        f.write(arr.tobytes())
    meta = {
        "tokens": int(arr.size),
        "tokenizer": data_mod.TOKENIZER_FILE,
        "token_dtype": "uint16",
        "documents": len(docs),
        "sources": sources,
        "sha256_of_tokens": hashlib.sha256(arr.tobytes()).hexdigest(),
    }
    (out / "sources.json").write_text(json.dumps(meta, indent=1))
    size = (out / "tokens.bin.xz").stat().st_size
    print(f"[corpus] {arr.size / 1e6:.1f}M tokens from {len(docs)} documents -> {out / 'tokens.bin.xz'} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

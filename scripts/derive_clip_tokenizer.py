"""Derive CLIP's BPE ``vocab.json`` + ``merges.txt`` from open_clip's ``bpe_simple_vocab_16e6.txt.gz``.

The tiny test models and the shipped models need a real CLIP tokenizer that works offline. open_clip (MIT) ships the
BPE merge list; the vocabulary is fully determined by it (byte alphabet, the same with ``</w>``, every merge, then the
two special tokens), which is how CLIP's own tokenizer builds it. Run once; the outputs are committed:

    pip download --no-deps open_clip_torch -d /tmp/oc && unzip -o /tmp/oc/*.whl 'open_clip/*.gz' -d /tmp/oc
    python scripts/derive_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parents[1] / "attncontrol" / "assets" / "clip_tokenizer"
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bpe_gz", type=Path, help="path to bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()

    with gzip.open(args.bpe_gz, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [ch + "</w>" for ch in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(args.out / "merges.txt", "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n")
        handle.write("\n".join(" ".join(m) for m in merges))
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()

"""Early exit on text: the data and tokenizer for sweeps/decode_text/run.sh, made offline from the
source files of the running Python's standard library (no hub download).

    python sweeps/decode_text/data.py OUT    # OUT/data/{train,validation}.jsonl and OUT/tokenizer/

Documents are the top-level stdlib modules under 100 KB, sorted by name; every 16th is held out.
The tokenizer is a byte-level BPE of 2048 tokens trained on the training documents only, saved by
transformers' save_pretrained, so TextTask loads it as it would a hub tokenizer.
"""

import json
import sys
import sysconfig
from pathlib import Path

VOCAB = 2048
EOS = "<|endoftext|>"


def documents() -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size < 100_000)
    return [(p.name, p.read_text(encoding="utf-8")) for p in files]


def write_split(path: Path, docs: list[tuple[str, str]]) -> None:
    with path.open("w") as f:
        for name, text in docs:
            f.write(json.dumps({"name": name, "text": text}) + "\n")


def train_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=VOCAB, min_frequency=2, special_tokens=[EOS])
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS).save_pretrained(str(out))


def main(out: Path) -> None:
    docs = documents()
    train = [d for i, d in enumerate(docs) if i % 16 != 15]
    held_out = [d for i, d in enumerate(docs) if i % 16 == 15]
    (out / "data").mkdir(parents=True, exist_ok=True)
    write_split(out / "data" / "train.jsonl", train)
    write_split(out / "data" / "validation.jsonl", held_out)
    train_tokenizer([text for _, text in train], out / "tokenizer")
    print(f"Python {sys.version.split()[0]} stdlib: {len(train)} training and {len(held_out)} "
          f"held-out modules ({', '.join(name for name, _ in held_out)}); tokenizer of {VOCAB} in "
          f"{out / 'tokenizer'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python sweeps/decode_text/data.py OUT")
    main(Path(sys.argv[1]))

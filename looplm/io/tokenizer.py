"""The tokenizer files of an export: the run's HF tokenizer as it is, or, for an embedded task, a
word-level tokenizer over the task's vocabulary that encodes its text to the task's own ids."""

import ast
import importlib
from pathlib import Path

SPECIAL = ("<pad>", "<eos>", "<bos>")  # HF roles of the embedded tasks' control tokens


def task_record(record: str) -> tuple[str, dict]:
    """(class name, simple attributes) from the trainer's run-config entry `Name{...}`."""
    name, _, attributes = record.partition("{")
    try:
        values = ast.literal_eval("{" + attributes)
    except (ValueError, SyntaxError):
        raise ValueError(f"the run's task record {record[:80]!r} is not `Name{{attributes}}`") from None
    return name, values


def embedded_vocabulary(name: str, values: dict) -> list[str]:
    """The token strings of an embedded task, id order: its `vocab`, else its module's VOCAB."""
    if isinstance(values.get("vocab"), list):
        return values["vocab"]
    import looplm.data
    cls = getattr(looplm.data, name, None)
    vocab = getattr(importlib.import_module(cls.__module__), "VOCAB", None) if cls else None
    if not isinstance(vocab, list):
        raise ValueError(f"task {name} records no vocabulary (a `vocab` list, or VOCAB in its module): "
                         "cannot write a tokenizer for it")
    return vocab


def vocabulary_tokenizer(vocab: list[str]):
    """A transformers fast tokenizer whose ids are the positions in `vocab`. Text in which the
    space is itself a token (addition) is split into characters and <...> tokens and joined
    back without separators; other tasks' text is space-separated words."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    if len(set(vocab)) != len(vocab):
        raise ValueError("the task's vocabulary repeats a token: ids would not round-trip")
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=None))
    if " " in vocab:
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"<[^<>\s]+>|."), behavior="isolated")
        tok.decoder = decoders.Fuse()
    else:
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    roles = {role: token for role, token in zip(("pad_token", "eos_token", "bos_token"), SPECIAL) if token in vocab}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles)


def save_tokenizer(record: str, out: Path) -> str:
    """Write the run's tokenizer into `out`; returns what was written, in words."""
    name, values = task_record(record)
    if "tokenizer_name" in values:  # TextTask: an HF tokenizer, saved as it is
        from looplm.data.text import load_tokenizer
        load_tokenizer(values["tokenizer_name"], values.get("hf_cache_dir")).save_pretrained(out)
        return f"the HF tokenizer {values['tokenizer_name']!r}"
    vocab = embedded_vocabulary(name, values)
    vocabulary_tokenizer(vocab).save_pretrained(out)
    return f"a {len(vocab)}-token vocabulary tokenizer for {name}"

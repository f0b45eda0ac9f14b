"""A toy chat world built on the spot (no hub): a word-level tokenizer with a ChatML template,
conversations and a text corpus over its words. Used by the chat task and pipeline tests."""

import json
from pathlib import Path

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
WORDS = ["system", "user", "assistant", "be", "brief", "add", "and", "more", "is", "the", "cat", "sat", "on",
         "mat", ".", "?", *"zero one two three four five six seven eight nine ten".split()]


def make_chat_tokenizer(path: Path, chat_template: str | None = CHATML) -> Path:
    """Saved as a local folder; ids: SPECIAL then WORDS in order."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*SPECIAL, *WORDS])}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = chat_template
    tok.save_pretrained(path)
    return path


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


NUMBERS = "zero one two three four five six seven eight nine ten".split()


def sums(n: int) -> list[list[dict]]:
    """n (at most 24) distinct conversations `add a and b ?` -> the sum in words, some with a
    follow-up turn."""
    out = []
    for k in range(n):
        a, b = k % 6, k // 6
        chat = [turn("user", f"add {NUMBERS[a]} and {NUMBERS[b]} ?"), turn("assistant", f"{NUMBERS[a + b]} .")]
        if k % 3 == 0:
            chat += [turn("user", "and one more ?"), turn("assistant", f"{NUMBERS[a + b + 1]} .")]
        out.append(chat)
    return out


def write_jsonl(path: Path, conversations: list, field: str = "messages") -> Path:
    path.write_text("".join(json.dumps({field: c}) + "\n" for c in conversations))
    return path


def write_corpus(path: Path, lines: int = 200) -> Path:
    """Plain text over the tokenizer's words (for TextTask), one line a record."""
    path.write_text("".join(f"the cat sat on the mat . {NUMBERS[k % 10]} and {NUMBERS[(k + 1) % 10]} .\n"
                            for k in range(lines)))
    return path

"""Chat / SFT data: a Huggingface dataset of conversations rendered by the model's tokenizer and
its chat template, the loss on the assistant's tokens only, whole conversations packed into rows.

The token ids are exactly those `tokenizer.apply_chat_template(messages)` gives (the rendered
text, tokenized once), so the model trains on what it will be prompted with at inference.
"""

from collections.abc import Iterator
from pathlib import Path

import gin

from looplm.data.batch import IGNORE_INDEX, Batch
from looplm.data.packing import pack
from looplm.data.text import check_dataset, check_local_data, epoch_order, load_split, load_tokenizer


def _render(tokenizer, messages: list, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and, for each assistant message, the characters it adds after
    the template's generation prompt: its content and end-of-turn marker, the text the model
    writes when prompted. The template must render each conversation as a continuation of its
    first messages (most do; one that rewrites earlier turns is refused)."""
    text, spans = _render(tokenizer, messages), []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError("the conversation opens with an assistant message: no prompt precedes it")
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(f"the chat template does not render message {i} as a continuation of the "
                             "messages before it (it rewrites earlier turns), so the assistant's tokens "
                             "cannot be told apart")
        spans.append((len(before), len(through)))
    return text, spans


def render_conversation(tokenizer, messages: list) -> tuple[list[int], list[bool]]:
    """The conversation's token ids and, per token, whether it is the assistant's (its first
    character lies in an assistant span)."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mine = [any(a <= start < b for a, b in spans) for start, _ in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mine


def check_messages(messages) -> list:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
        raise ValueError(f"a conversation must be a non-empty list of {{'role': ..., 'content': ...}} "
                         f"messages, got {str(messages)[:80]!r}")
    return messages


@gin.configurable
class ChatTask:
    """Supervised fine-tuning on conversations: each record's `messages_field` holds a list of
    {"role", "content"} messages, rendered through the tokenizer's chat template; the targets are
    the assistant's tokens (see assistant_spans), every other position has no loss.

    Conversations are packed whole into rows of seq_len inputs with doc_ids (attention never
    crosses conversations); one longer than seq_len + 1 tokens is cut to its first seq_len + 1
    (n_truncated counts them in the training split), and one left without an assistant token is
    dropped (n_unsupervised).
    Training rows come in per-epoch permutations seeded by (seed, epoch); eval rows are the
    eval_split's, in order, at most max_eval_rows.

    dataset: a local .json/.jsonl/.parquet file, a folder of them (splits named by file), a folder
    written by datasets' save_to_disk, or a hub dataset. split/eval_split take datasets' slicing:
    the defaults hold out the last 5% of "train". tokenizer: a folder or hub name; the run's
    vocabulary is len(tokenizer), so a checkpoint whose vocabulary is smaller is an error.
    """

    name = "chat"

    def __init__(self, dataset: str, tokenizer: str, messages_field: str = "messages",
                 dataset_config: str | None = None, seq_len: int = 1024, split: str = "train[:95%]",
                 eval_split: str = "train[95%:]", max_eval_rows: int | None = None,
                 hf_cache_dir: str | None = None, seed: int = 0):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"ChatTask.seq_len={seq_len!r}: allowed are integers >= 1")
        if max_eval_rows is not None and (not isinstance(max_eval_rows, int) or max_eval_rows < 1):
            raise ValueError(f"ChatTask.max_eval_rows={max_eval_rows!r}: allowed are None or integers >= 1")
        check_dataset(dataset, dataset_config, "ChatTask")
        self.dataset, self.dataset_config, self.messages_field = dataset, dataset_config, messages_field
        self.seq_len, self.seed, self.hf_cache_dir = seq_len, seed, hf_cache_dir
        self.tokenizer_name = tokenizer  # the name the exporter saves the tokenizer from
        self.tokenizer = load_tokenizer(tokenizer, hf_cache_dir)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"ChatTask.tokenizer={tokenizer!r} has no chat template: allowed are "
                             "tokenizers with one (set tokenizer.chat_template and save_pretrained it)")
        if not self.tokenizer.is_fast:
            raise ValueError(f"ChatTask.tokenizer={tokenizer!r} is a slow tokenizer: allowed are fast "
                             "ones (their character offsets tell the assistant's tokens apart)")
        self.vocab_size = len(self.tokenizer)
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else eos if eos is not None else 0
        self._train_rows, (self.n_truncated, self.n_unsupervised) = self._rows(split)
        self._eval_rows = self._rows(eval_split)[0][:max_eval_rows]
        self.n_train_rows, self.n_eval_rows = len(self._train_rows.input_ids), len(self._eval_rows.input_ids)

    def train_batch(self, step: int, batch_size: int) -> Batch:
        """Rows in epoch_order: a fixed function of (seed, step)."""
        return self._train_rows[epoch_order(step, batch_size, self.n_train_rows, self.seed)]

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        for start in range(0, self.n_eval_rows, batch_size):
            yield self._eval_rows[start : start + batch_size]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def _conversations(self, split: str, counts: list[int]) -> Iterator[tuple[list[int], list[int]]]:
        """(inputs, targets) of each supervised conversation of `split`; counts the truncated and
        the unsupervised ones in `counts`."""
        from jinja2 import TemplateError

        where = f"split {split!r} of ChatTask.dataset={self.dataset!r}"
        ds = load_split(self.dataset, self.dataset_config, split, self.hf_cache_dir)
        if self.messages_field not in ds.column_names:
            raise ValueError(f"ChatTask.messages_field={self.messages_field!r} is not a column of {where}; the "
                             f"columns are {ds.column_names}")
        for index, messages in enumerate(ds[self.messages_field]):
            try:
                ids, mine = render_conversation(self.tokenizer, check_messages(messages))
            except (ValueError, TemplateError) as error:
                raise ValueError(f"record {index} of {where}: {error}") from None
            counts[0] += len(ids) > self.seq_len + 1
            ids, mine = ids[: self.seq_len + 1], mine[: self.seq_len + 1]
            targets = [token if assistant else IGNORE_INDEX for token, assistant in zip(ids[1:], mine[1:])]
            if all(t == IGNORE_INDEX for t in targets):
                counts[1] += 1
                continue
            yield ids[:-1], targets

    def _rows(self, split: str) -> tuple[Batch, list[int]]:
        """The split packed, and its numbers of truncated and unsupervised conversations."""
        if Path(self.dataset).expanduser().exists():
            check_local_data(self.dataset, "ChatTask")
        counts = [0, 0]
        conversations = list(self._conversations(split, counts))
        if not conversations:
            raise ValueError(f"split {split!r} of ChatTask.dataset={self.dataset!r} holds no conversation with "
                             "an assistant message to train on")
        return pack(iter(conversations), self.seq_len, self.pad_id, None), counts

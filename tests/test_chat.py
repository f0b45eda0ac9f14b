"""looplm.data.chat: the loss covers exactly the assistant's tokens (checked token by token on a
hand-made conversation), packing keeps the targets aligned, held-out conversations stay out of
training, and bad data, a tokenizer without a chat template or a model vocabulary too small are
clear errors."""

import gin
import pytest
import torch
from toy_chat import SPECIAL, WORDS, make_chat_tokenizer, sums, turn, write_jsonl

from looplm.config import model_config
from looplm.data import IGNORE_INDEX, ChatTask
from looplm.data.chat import render_conversation
from looplm.data.text import load_tokenizer
from looplm.train import train

ID = {w: i for i, w in enumerate([*SPECIAL, *WORDS])}
CONVERSATION = [turn("system", "be brief"), turn("user", "add two and two ?"), turn("assistant", "four ."),
                turn("user", "and one more ?"), turn("assistant", "five")]
# The rendered conversation token by token, the assistant's marked *: its words and its <|im_end|>
# (the model must learn to stop), never the role header the generation prompt already wrote.
EXPECTED = ("<|im_start|> system be brief <|im_end|> <|im_start|> user add two and two ? <|im_end|> "
            "<|im_start|> assistant four* .* <|im_end|>* <|im_start|> user and one more ? <|im_end|> "
            "<|im_start|> assistant five* <|im_end|>*").split()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_chat_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


def chat(tok_dir, dataset, **kw):
    return ChatTask(dataset=str(dataset), tokenizer=str(tok_dir), **({"split": "train", "eval_split": "train"} | kw))


def unpacked(tok_dir, conversation) -> tuple[list, list]:
    """(inputs, targets) of one conversation alone, from the expected token-by-token marking."""
    ids, mine = render_conversation(load_tokenizer(str(tok_dir)), conversation)
    return ids[:-1], [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mine[1:])]


def test_the_targets_are_exactly_the_assistants_tokens(tok_dir, tmp_path):
    ids, mine = render_conversation(load_tokenizer(str(tok_dir)), CONVERSATION)
    assert ids == [ID[t.rstrip("*")] for t in EXPECTED]
    assert mine == [t.endswith("*") for t in EXPECTED]
    assert ids == load_tokenizer(str(tok_dir)).apply_chat_template(CONVERSATION)["input_ids"]  # what inference sees
    task = chat(tok_dir, write_jsonl(tmp_path / "one.jsonl", [CONVERSATION]), seq_len=64)
    row = task.train_batch(0, 1)
    n = len(EXPECTED) - 1
    assert row.input_ids[0, :n].tolist() == ids[:-1]
    for k in range(n):  # the target at k predicts token k + 1, and only an assistant token has one
        want = ID[EXPECTED[k + 1].rstrip("*")] if EXPECTED[k + 1].endswith("*") else IGNORE_INDEX
        assert row.targets[0, k] == want, (k, EXPECTED[k + 1])
    assert (row.targets[0, n:] == IGNORE_INDEX).all() and (row.input_ids[0, n:] == task.pad_id).all()
    assert row.n_targets == 5


def test_packing_keeps_every_conversations_targets_aligned(tok_dir, tmp_path):
    conversations = sums(7)
    task = chat(tok_dir, write_jsonl(tmp_path / "c.jsonl", conversations), seq_len=40)
    rows, docs = task._train_rows, []
    for r in range(rows.input_ids.shape[0]):
        for d in rows.doc_ids[r].unique():
            at = rows.doc_ids[r] == d
            docs.append((rows.input_ids[r][at].tolist(), rows.targets[r][at].tolist()))
    real = [doc for doc in docs if any(t != IGNORE_INDEX for t in doc[1])]  # the padding has no targets
    assert real == [unpacked(tok_dir, c) for c in conversations]
    assert rows.input_ids.shape[0] < len(conversations)  # several conversations share a row
    assert sum(len(inputs) for inputs, _ in docs) == rows.input_ids.numel()


def test_a_long_conversation_is_cut_to_the_row_and_an_unsupervised_one_dropped(tok_dir, tmp_path):
    long = [turn("user", "add " + "one and " * 20 + "one ?"), turn("assistant", "ten . " * 10)]
    silent = [turn("user", "be brief")]
    task = chat(tok_dir, write_jsonl(tmp_path / "c.jsonl", [long, silent, CONVERSATION]), seq_len=48)
    assert task.n_truncated == 1 and task.n_unsupervised == 1
    inputs, targets = unpacked(tok_dir, long)
    assert task._train_rows.input_ids[0].tolist() == inputs[:48]
    assert task._train_rows.targets[0].tolist() == targets[:48]


def test_held_out_conversations_are_never_trained_on(tok_dir, tmp_path):
    conversations = sums(20)
    task = chat(tok_dir, write_jsonl(tmp_path / "c.jsonl", conversations), seq_len=32,
                split="train[:80%]", eval_split="train[80%:]")
    held_out = {tuple(unpacked(tok_dir, c)[0]) for c in conversations[16:]}
    trained = {tuple(unpacked(tok_dir, c)[0]) for c in conversations[:16]}

    def seen(batch):
        return {tuple(batch.input_ids[r][batch.doc_ids[r] == d].tolist())
                for r in range(batch.input_ids.shape[0]) for d in batch.doc_ids[r].unique()}

    evaluated = set().union(*map(seen, task.eval_batches(3)))
    assert held_out <= evaluated and not trained & evaluated
    for step in range(6):
        assert not held_out & seen(task.train_batch(step, 4))
    assert torch.equal(task.train_batch(5, 4).input_ids, chat(tok_dir, tmp_path / "c.jsonl", seq_len=32,
                       split="train[:80%]", eval_split="train[80%:]").train_batch(5, 4).input_ids)


def test_a_saved_dataset_folder_and_parquet_give_the_same_rows(tok_dir, tmp_path):
    import datasets

    conversations = sums(10)
    ds = datasets.Dataset.from_list([{"messages": c} for c in conversations])
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    ds.to_parquet(str(tmp_path / "c.parquet"))
    split = {"split": "train[:7]", "eval_split": "train[7:]", "seq_len": 32}
    reference = chat(tok_dir, write_jsonl(tmp_path / "c.jsonl", conversations), **split)
    for source in ("saved", "saved_dict", "c.parquet"):
        task = chat(tok_dir, tmp_path / source, **split)
        for mine, theirs in ((task._train_rows, reference._train_rows), (task._eval_rows, reference._eval_rows)):
            assert torch.equal(mine.input_ids, theirs.input_ids) and torch.equal(mine.targets, theirs.targets)


def test_gin_builds_the_task(tok_dir, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", sums(4))
    gin.clear_config()
    try:
        gin.parse_config([f"ChatTask.dataset = '{path}'", f"ChatTask.tokenizer = '{tok_dir}'",
                          "ChatTask.split = 'train'", "ChatTask.eval_split = 'train'", "ChatTask.seq_len = 16"])
        assert ChatTask().seq_len == 16
    finally:
        gin.clear_config()


def test_a_dataset_without_the_messages_field_is_a_clear_error(tok_dir, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", sums(3), field="conversation")
    with pytest.raises(ValueError, match=r"messages_field='messages' is not a column.*\['conversation'\]"):
        chat(tok_dir, path)
    assert chat(tok_dir, path, messages_field="conversation").n_train_rows == 1


def test_a_tokenizer_without_a_chat_template_is_a_clear_error(tmp_path):
    plain = make_chat_tokenizer(tmp_path / "plain", chat_template=None)
    with pytest.raises(ValueError, match=r"ChatTask.tokenizer='.*plain' has no chat template"):
        chat(plain, write_jsonl(tmp_path / "c.jsonl", sums(3)))


@pytest.mark.parametrize("record, message", [
    ("not a list", r"record 1 of split 'train'.*a non-empty list of"),
    ([{"content": "no role"}], r"record 1 of split 'train'.*a non-empty list of"),
    ([turn("assistant", "four")], r"record 1 of split 'train'.*opens with an assistant message"),
])
def test_a_malformed_conversation_is_an_error_naming_its_record(tok_dir, tmp_path, record, message):
    with pytest.raises(ValueError, match=message):
        chat(tok_dir, write_jsonl(tmp_path / "c.jsonl", [CONVERSATION, record]))


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    latest_only = "{{ messages[-1]['content'] }}{% if add_generation_prompt %} assistant{% endif %}"
    tok = make_chat_tokenizer(tmp_path / "tok", chat_template=latest_only)
    with pytest.raises(ValueError, match=r"record 0 .*does not render message 2 as a continuation"):
        chat(tok, write_jsonl(tmp_path / "c.jsonl", [CONVERSATION]))


def test_a_model_vocabulary_smaller_than_the_tokenizers_is_a_clear_error(tok_dir, tmp_path):
    task = chat(tok_dir, write_jsonl(tmp_path / "c.jsonl", sums(3)), seq_len=16)
    assert task.vocab_size == len(SPECIAL) + len(WORDS)
    with pytest.raises(ValueError, match=rf"vocab_size=8 is fixed but ChatTask has {task.vocab_size} tokens"):
        train(task=task, model_config=model_config(preset="tiny", vocab_size=8), dry_run=True)
    sized = train(task=task, model_config=model_config(preset="tiny"), dry_run=True)["model"]
    assert sized.vocab_size == task.vocab_size

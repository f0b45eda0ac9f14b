"""Natural-language data: an HF dataset tokenized once by an HF tokenizer, packed into blocks.

datasets and transformers are imported inside the functions that need them: importing them costs
seconds, and the embedded tasks do not need them.
"""

import codecs
import functools
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import gin
import torch

from looplm.data.batch import Batch, generator

BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json",
            ".parquet": "parquet", ".csv": "csv"}
LOCAL_HINT = ("To work offline pass local files instead, e.g. TextTask(dataset='data/' (a folder "
              "holding train.txt and validation.txt) or dataset='corpus.txt' with "
              "split='train[:99%]', eval_split='train[99%:]', tokenizer='path/to/tokenizer_dir' "
              "(a folder written by save_pretrained)).")


class HubUnreachableError(ConnectionError, ValueError):
    """A hub name was given and the Hugging Face hub could not supply it (a ValueError too: to the
    command line it is bad input, answered with exit code 2)."""


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What datasets/transformers raise when the hub is offline, unreachable or lacks the name."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    return (OSError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled)


def _unreachable(what: str, name: str, error: BaseException) -> HubUnreachableError:
    return HubUnreachableError(
        f"{what} {name!r} is not a local path, and the Hugging Face hub is unreachable (offline?) "
        f"or has no such {what}: {type(error).__name__}: {error}. {LOCAL_HINT}")


TEXT_SUFFIXES = (".txt", ".text", ".json", ".jsonl", ".csv")  # read as UTF-8 by datasets


def looks_local(dataset: str) -> bool:
    """Whether `dataset` is meant as a local path: a hub name is 'name' or 'org/name', never a
    file name with a data suffix nor a path starting with /, ., or ~."""
    return dataset.startswith(("/", ".", "~")) or Path(dataset).suffix in BUILDERS


def check_dataset(dataset: str, dataset_config: str | None, owner: str = "TextTask") -> None:
    """Raise ValueError, naming `owner`'s argument, for a local path that does not exist, a local
    path with a hub dataset_config, or a local file of a format datasets does not read."""
    local = Path(dataset).expanduser()
    if not local.exists() and looks_local(dataset):
        raise ValueError(f"{owner}.dataset={dataset!r}: no such file or folder (a local dataset is "
                         f"a file ending in one of {sorted(BUILDERS)} or a folder of them)")
    if local.exists() and dataset_config is not None:
        raise ValueError(f"{owner}.dataset_config={dataset_config!r}: allowed only with a hub "
                         f"dataset, and {dataset!r} is a local path (pass None)")
    if local.is_file() and local.suffix not in BUILDERS:
        raise ValueError(f"{owner}.dataset={dataset!r}: a local file must end in one of "
                         f"{sorted(BUILDERS)}")


def check_local_data(dataset: str, owner: str = "TextTask") -> None:
    """Raise ValueError, naming the file, for a local dataset that datasets would fail on without
    saying why: a folder with no data files, an empty file, or text that is not UTF-8."""
    local = Path(dataset).expanduser()
    files = sorted(f for f in local.rglob("*") if f.is_file() and f.suffix in BUILDERS) \
        if local.is_dir() else [local]
    if not files:
        raise ValueError(f"{owner}.dataset={dataset!r} is a folder without data files: allowed are "
                         f"files ending in {sorted(BUILDERS)} (named by split, e.g. train.txt)")
    for f in files:
        if f.stat().st_size == 0:
            raise ValueError(f"{owner}.dataset={dataset!r}: {str(f)!r} is empty; a data file needs "
                             "at least one non-blank record")
        if f.suffix in TEXT_SUFFIXES:
            _check_utf8(f, dataset, owner)


def _check_utf8(path: Path, dataset: str, owner: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                raise ValueError(f"{owner}.dataset={dataset!r}: {str(path)!r} is not UTF-8 text (byte "
                                 f"{offset + error.start}: {error.reason}); allowed is UTF-8, e.g. "
                                 "convert it with `iconv -f latin1 -t utf-8`") from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"{owner}.dataset={dataset!r}: {str(path)!r} is not UTF-8 text (it ends "
                             "inside a multi-byte character)") from None


def load_tokenizer(name: str, hf_cache_dir: str | None = None):
    """AutoTokenizer from a local folder or a hub name, with a readable error when offline."""
    from transformers import AutoTokenizer

    if Path(name).expanduser().is_dir():
        return AutoTokenizer.from_pretrained(str(Path(name).expanduser()))
    try:
        return AutoTokenizer.from_pretrained(name, cache_dir=hf_cache_dir)
    except _hub_errors() as error:
        raise _unreachable("tokenizer", name, error) from error


def load_split(dataset: str, config: str | None, split: str, hf_cache_dir: str | None = None):
    """One split of a local file, a local folder (splits named by its files, or written by
    datasets' save_to_disk), or a hub dataset."""
    import datasets

    local = Path(dataset).expanduser()
    if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
        return _saved_split(local, split)
    if local.is_dir():
        return datasets.load_dataset(str(local), split=split, cache_dir=hf_cache_dir)
    if local.is_file():
        return datasets.load_dataset(BUILDERS[local.suffix], data_files=str(local), split=split,
                                     cache_dir=hf_cache_dir)
    try:
        return datasets.load_dataset(dataset, config, split=split, cache_dir=hf_cache_dir)
    except _hub_errors() as error:
        raise _unreachable("dataset", dataset, error) from error


def _saved_split(local: Path, split: str):
    """`split` (datasets' slicing too, e.g. "train[:95%]") of a save_to_disk folder; a saved
    Dataset, not a DatasetDict, is the split "train"."""
    import datasets

    saved = datasets.load_from_disk(str(local))
    splits = saved if isinstance(saved, datasets.DatasetDict) else {"train": saved}
    try:
        parts = datasets.ReadInstruction.from_spec(split).to_absolute({k: len(v) for k, v in splits.items()})
    except (ValueError, AssertionError) as error:
        raise ValueError(f"split {split!r} of the saved dataset {str(local)!r}: {error}") from None
    return datasets.concatenate_datasets([splits[p.splitname].select(range(p.from_, p.to)) for p in parts])


def tokenize_split(ds, tokenizer, text_field: str) -> torch.Tensor:
    """All non-empty records of `ds` as one int32 token stream, each record followed by eos."""
    if text_field not in ds.column_names:
        raise ValueError(f"text_field={text_field!r} is not a column; the columns are "
                         f"{ds.column_names}")
    eos = tokenizer.eos_token_id

    def tokenize(records):
        texts = [text for text in records[text_field] if text and text.strip()]
        if not texts:  # a batch of blank records (the tokenizer fails on an empty list)
            return {"ids": []}
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"ids": [doc + [eos] for doc in ids]}

    tokenized = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenizing")
    chunks = [table.column("ids").combine_chunks().flatten().to_numpy().astype("int32")
              for table in tokenized.with_format("arrow").iter(batch_size=65536)]
    chunks = [torch.from_numpy(chunk) for chunk in chunks]
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.int32)


@functools.lru_cache(maxsize=4)
def _permutation(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n_blocks, generator=generator(seed, epoch))


def epoch_order(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Items step*B .. step*B + B - 1 of an endless sequence of epochs over n items, each epoch a
    permutation seeded by (seed, epoch): resuming at step k needs nothing but k."""
    index = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, position = index // n, index % n
    return torch.stack([_permutation(n, seed, int(e))[p] for e, p in zip(epochs, position)])


@gin.configurable
class TextTask:
    """Next-token prediction on packed blocks of seq_len + 1 tokens (consecutive blocks share one).

    Records are documents: each is followed by eos, and a new document id starts after each eos,
    so attention never crosses documents. The target at an eos position is the next document's
    first token, predicted from the previous document alone (the marginal of first tokens).

    dataset is a hub name (with dataset_config, e.g. "wikitext" / "wikitext-103-raw-v1") or a
    local path: a .txt/.json/.jsonl/.parquet/.csv file, or a folder whose file names give the
    splits (train.txt, validation.txt). split/eval_split accept datasets' slicing, e.g.
    "train[:99%]". The token stream of each split is cached under cache_dir, keyed by a hash of
    (dataset and its files' sizes and mtimes, config, split, text_field, tokenizer and its
    vocabulary); seq_len is not in the key because blocks are cut at load time. hf_cache_dir is
    passed to datasets and transformers (None: their default caches).
    """

    name = "text"

    def __init__(self, dataset: str, tokenizer: str = "HuggingFaceTB/SmolLM2-135M",
                 dataset_config: str | None = None, text_field: str = "text", seq_len: int = 512,
                 split: str = "train", eval_split: str = "validation",
                 max_eval_blocks: int | None = None, cache_dir: str = "~/.cache/looplm/text",
                 hf_cache_dir: str | None = None, seed: int = 0):
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"TextTask.seq_len={seq_len!r}: allowed are integers >= 1")
        if max_eval_blocks is not None and (not isinstance(max_eval_blocks, int)
                                            or max_eval_blocks < 1):
            raise ValueError(f"TextTask.max_eval_blocks={max_eval_blocks!r}: allowed are None or "
                             "integers >= 1")
        check_dataset(dataset, dataset_config)
        self.dataset, self.dataset_config, self.text_field = dataset, dataset_config, text_field
        self.seq_len, self.seed, self.hf_cache_dir = seq_len, seed, hf_cache_dir
        self.cache_dir = Path(cache_dir).expanduser()
        self.tokenizer_name = tokenizer
        self.tokenizer = load_tokenizer(tokenizer, hf_cache_dir)
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"TextTask.tokenizer={tokenizer!r} has no eos token; packing needs "
                             "one to separate documents")
        self.vocab_size = len(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.eos_id if pad is None else pad  # rows are full blocks: never padded
        self.train_tokens = self._tokens(split)
        self.eval_tokens = self._tokens(eval_split)
        self.n_train_blocks = self._n_blocks(self.train_tokens, split)
        n_eval_blocks = self._n_blocks(self.eval_tokens, eval_split)
        self.n_eval_blocks = min(n_eval_blocks, max_eval_blocks or n_eval_blocks)

    def train_batch(self, step: int, batch_size: int) -> Batch:
        """Blocks in epoch_order: a fixed function of (seed, step)."""
        return self._blocks(self.train_tokens, epoch_order(step, batch_size, self.n_train_blocks, self.seed))

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """The first n_eval_blocks blocks of eval_split in order; the last batch may be smaller."""
        for start in range(0, self.n_eval_blocks, batch_size):
            end = min(start + batch_size, self.n_eval_blocks)
            yield self._blocks(self.eval_tokens, torch.arange(start, end))

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def cache_path(self, split: str) -> Path:
        """Where the token stream of `split` is cached; changes when any input to it changes."""
        local = Path(self.dataset).expanduser()
        files = sorted(local.rglob("*")) if local.is_dir() else [local] if local.is_file() else []
        key = {
            "dataset": str(local.resolve()) if local.exists() else self.dataset,
            "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns)
                      for f in files if f.is_file()],
            "config": self.dataset_config, "split": split, "text_field": self.text_field,
            "tokenizer": self.tokenizer_name, "eos": self.eos_id,
            "vocab": sorted(self.tokenizer.get_vocab().items()),
        }
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]
        return self.cache_dir / f"tokens-{digest}.pt"

    def _tokens(self, split: str) -> torch.Tensor:
        path = self.cache_path(split)
        if path.exists():
            return torch.load(path, mmap=True, weights_only=True)
        if Path(self.dataset).expanduser().exists():
            check_local_data(self.dataset)
        ds = load_split(self.dataset, self.dataset_config, split, self.hf_cache_dir)
        tokens = tokenize_split(ds, self.tokenizer, self.text_field)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(tokens, partial)
        partial.replace(path)  # atomic: an interrupted run leaves no truncated cache behind
        return tokens

    def _n_blocks(self, tokens: torch.Tensor, split: str) -> int:
        n = (len(tokens) - 1) // self.seq_len
        if len(tokens) == 0:
            raise ValueError(f"split {split!r} of TextTask.dataset={self.dataset!r} holds no text: every "
                             f"record in field {self.text_field!r} is blank")
        if n < 1:
            raise ValueError(f"split {split!r} of {self.dataset!r} has {len(tokens)} tokens; one "
                             f"block needs seq_len + 1 = {self.seq_len + 1}")
        return n

    def _blocks(self, tokens: torch.Tensor, blocks: torch.Tensor) -> Batch:
        offsets = blocks[:, None] * self.seq_len + torch.arange(self.seq_len + 1)
        rows = tokens[offsets].long()
        inputs, targets = rows[:, :-1], rows[:, 1:]
        is_eos = (inputs == self.eos_id).long()
        return Batch(inputs.contiguous(), targets.contiguous(), is_eos.cumsum(dim=1) - is_eos)

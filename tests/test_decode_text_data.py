"""sweeps/decode_text/data.py, the offline text of the early-exit-on-text experiment: held-out
modules are never trained on, and TextTask loads the data and the saved tokenizer as it would a
hub dataset and tokenizer."""

import importlib.util
import json
from pathlib import Path

from looplm.data.text import TextTask
from looplm.infer.held_out import held_out_units

SCRIPT = Path(__file__).resolve().parents[1] / "sweeps" / "decode_text" / "data.py"


def test_stdlib_text_splits_and_tokenizer_load_in_text_task(tmp_path):
    spec = importlib.util.spec_from_file_location("decode_text_data", SCRIPT)
    data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(data)
    data.main(tmp_path)
    names = {split: [json.loads(line)["name"] for line in (tmp_path / "data" / f"{split}.jsonl").open()]
             for split in ("train", "validation")}
    every = [name for name, _ in data.documents()]
    assert names["validation"] == every[15::16] and len(names["validation"]) >= 5
    assert not set(names["train"]) & set(names["validation"])
    assert sorted(names["train"] + names["validation"]) == sorted(every)
    task = TextTask(dataset=str(tmp_path / "data"), tokenizer=str(tmp_path / "tokenizer"), seq_len=64,
                    max_eval_blocks=8, cache_dir=str(tmp_path / "tokens"))
    assert task.vocab_size == data.VOCAB and task.tokenizer.convert_ids_to_tokens(task.eos_id) == data.EOS
    units = held_out_units(task)
    assert len(units) == 8 and all(len(u.prompt) + len(u.answer) == 65 for u in units)
    first = json.loads((tmp_path / "data" / "validation.jsonl").open().readline())["text"]
    assert first.startswith(task.decode(units[0].prompt))  # the first held-out module, round-tripped

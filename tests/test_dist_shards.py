"""Sharded checkpoints on disk (looplm.dist.shards, looplm.dist.state), in one process: tensors
round-trip, the folder appears whole or not at all, a `.metadata` that would run code or hold
non-tensor entries is refused, and a save that dies before its commit leaves the previous
checkpoint whole."""

import os
import pickle
import types

import pytest
import torch
import torch.distributed as dist

from looplm import checkpoint, rundir
from looplm.dist import shards
from looplm.dist.state import Checkpointer
from looplm.dist.world import World


def test_tensors_round_trip_and_the_rest_keeps_its_place(tmp_path):
    nested = {"model": {"a.weight": torch.randn(3, 4), "b": torch.arange(5)},
              "optimizer": {"state": {"a.weight": {"step": torch.tensor(2.0), "exp_avg": torch.ones(3, 4)}},
                            "param_groups": [{"lr": 0.1, "params": ["a.weight"]}]}}
    tensors, rest = shards.flatten(nested)
    assert sorted(tensors) == ["model/a.weight", "model/b", "optimizer/state/a.weight/exp_avg",
                               "optimizer/state/a.weight/step"]
    assert rest["optimizer"]["param_groups"] == [{"lr": 0.1, "params": ["a.weight"]}]
    shards.write(tmp_path / "ck", tensors)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # renamed from its temporary
    back = shards.unflatten(shards.read_full(tmp_path / "ck"), rest)
    assert back["optimizer"]["param_groups"] == nested["optimizer"]["param_groups"]
    torch.testing.assert_close(shards.flatten(back)[0], tensors, rtol=0, atol=0)
    with pytest.raises(ValueError, match="without '/'"):
        shards.flatten({"a/b": torch.zeros(1)})


def _pointing_at(tmp_path, folder: str):
    path = tmp_path / checkpoint.CHECKPOINT_NAME
    checkpoint.save(path, {"shards": folder, "sharded_rest": {}, "step": 1})
    return path


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_metadata_file_that_would_run_code_is_refused_unrun(tmp_path):
    (tmp_path / "evil").mkdir()
    marker = tmp_path / "code-ran"
    (tmp_path / "evil" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    path = _pointing_at(tmp_path, "evil")
    assert checkpoint.load(path)["step"] == 1  # the file alone needs no shards
    with pytest.raises(checkpoint.CheckpointError, match="posix.mkdir is not allowed"):
        checkpoint.load(path, require=("model",))
    assert not marker.exists()


def test_non_tensor_entries_are_refused(tmp_path):
    """DCP would unpickle them with weights_only=False; looplm keeps them in checkpoint.pt."""
    shards.write(tmp_path / "bytes", {"model/x": torch.zeros(2), "model/y": "text"})
    with pytest.raises(checkpoint.CheckpointError, match="BytesStorageMetadata is not allowed"):
        checkpoint.load(_pointing_at(tmp_path, "bytes"), require=("model",))


def test_a_missing_shard_folder_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="names the shard folder .*gone"):
        checkpoint.load(_pointing_at(tmp_path, "gone"), require=("model",))


@pytest.fixture
def one_rank_group(tmp_path):
    """A process group of this process alone, so Checkpointer's collectives run here."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_save_killed_before_its_commit_leaves_the_previous_checkpoint(tmp_path, one_rank_group, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    step_module = types.SimpleNamespace(model=model)
    saver = Checkpointer(run_dir, World(rank=0, size=2))  # writes shards, as N ranks do

    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    saver.save(step_module, optimizer, {"step": 1})
    first = {k: v.clone() for k, v in model.state_dict().items()}
    assert checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME)["shards"] == "checkpoint-shards-a"

    with torch.no_grad():
        model.weight.add_(1.0)

    def killed(path, state):
        raise KeyboardInterrupt("killed while writing checkpoint.pt")

    monkeypatch.setattr(checkpoint, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        saver.save(step_module, optimizer, {"step": 2})
    monkeypatch.undo()
    assert (run_dir / "checkpoint-shards-b").is_dir()  # the new shards, never committed
    state = checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME, require=("model", "optimizer"))
    assert state["step"] == 1 and state["shards"] == "checkpoint-shards-a"
    torch.testing.assert_close(state["model"], first, rtol=0, atol=0)
    assert set(state["optimizer"]["state"]) == {"weight", "bias"}

    resumed = Checkpointer(run_dir, World(rank=0, size=2), state)
    resumed.save(step_module, optimizer, {"step": 2})  # writes b again, commits it, drops a
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-shards-b", checkpoint.CHECKPOINT_NAME]
    rundir.prepare(run_dir, "overwrite")
    assert list(run_dir.iterdir()) == []

"""Ouro's Huggingface layout in and out (looplm.io): the exported tensors against a name/shape
table written from Ouro's module definitions, logits against a pure-torch Ouro forward that reads
only the safetensors file, transformers loading without remote code, import -> export bit for bit,
and the clear errors of a folder that does not fit."""

import json
import math
import os
import shutil
from pathlib import Path

import gin
import pytest
import torch
from safetensors.torch import load_file, save_file

import looplm.io  # noqa: F401  (registers the transformers classes)
from looplm import checkpoint
from looplm.config import PRESETS, model_config
from looplm.data import AdditionTask, ManoTask
from looplm.export import main as export_main
from looplm.io import LayoutError, ouro_checkpoint, upcycled_checkpoint
from looplm.io.export import export_model, export_run
from looplm.io.folder import INDEX_NAME, WEIGHTS_NAME, locate
from looplm.io.layout import model_config_from
from looplm.io.source import load_model
from looplm.io.tokenizer import save_tokenizer, vocabulary_tokenizer
from looplm.model import LoopLM
from looplm.recipe import GateTraining, Recipe
from looplm.train import train
from variants.priors import NoPrior

TINY = dict(preset="tiny", d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, n_loops=3, rope_base=1e4)


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    gin.bind_parameter("lr_multiplier.warmup_steps", 2)
    yield
    gin.clear_config()


def fit(run_dir, steps=8, **kw):
    args = dict(task=AdditionTask(n_eval=32), model_config=model_config(**TINY), run_dir=str(run_dir),
                steps=steps, batch_size=8, eval_every=1000, checkpoint_every=1000, eval_batch_size=32,
                progress=False, seed=1)
    return train(**(args | kw))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained tiny run (grouped-query attention, 2 layers, 3 loops) and its export."""
    root = tmp_path_factory.mktemp("io")
    gin.clear_config()
    gin.bind_parameter("lr_multiplier.warmup_steps", 2)
    fit(root / "run")
    gin.clear_config()
    export_run(root / "run", root / "hf")
    return root


def ouro_table(config: dict) -> dict:
    """Tensor name -> shape, from Ouro's modeling code (OuroModel / OuroDecoderLayer)."""
    d, f, v, n = (config[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
    hd = d // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    table = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d),
             "model.early_exit_gate.weight": (1, d), "model.early_exit_gate.bias": (1,)}
    for i in range(n):
        table |= {f"model.layers.{i}.{name}.weight": (d,) for name in (
            "input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2")}
        table |= {f"model.layers.{i}.self_attn.q_proj.weight": (q, d),
                  f"model.layers.{i}.self_attn.k_proj.weight": (kv, d),
                  f"model.layers.{i}.self_attn.v_proj.weight": (kv, d),
                  f"model.layers.{i}.self_attn.o_proj.weight": (d, q),
                  f"model.layers.{i}.mlp.gate_proj.weight": (f, d),
                  f"model.layers.{i}.mlp.up_proj.weight": (f, d),
                  f"model.layers.{i}.mlp.down_proj.weight": (d, f)}
    return table


def ouro_reference(folder: Path, ids: torch.Tensor):
    """Per-loop logits and gate logits of Ouro's forward, written from its equations with nothing
    but config.json and model.safetensors: sandwich norms inside the residual branch, split-half
    RoPE, causal softmax attention by explicit matmul, SwiGLU, the final norm after every loop
    carried into the next, untied head, gate Linear(d, 1) on the normed state."""
    c = json.loads((folder / "config.json").read_text())
    w = load_file(folder / WEIGHTS_NAME)
    eps, H, KV = c["rms_norm_eps"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c["hidden_size"] // H

    def rms(x, weight):
        return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    S = ids.shape[1]
    inv = 1.0 / c["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = torch.arange(S, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([angle.cos()] * 2, -1).float(), torch.cat([angle.sin()] * 2, -1).float()

    def rope(x):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def heads(x, n):
        return x.view(x.shape[0], S, n, hd).transpose(1, 2)

    causal = torch.full((S, S), float("-inf")).triu(1)
    x = w["model.embed_tokens.weight"][ids]
    logits, gates = [], []
    for _ in range(c["total_ut_steps"]):
        for i in range(c["num_hidden_layers"]):
            p = lambda name: w[f"model.layers.{i}.{name}.weight"]  # noqa: E731
            h = rms(x, p("input_layernorm"))
            q, k, v = (heads(h @ p(f"self_attn.{n}_proj").T, m) for n, m in (("q", H), ("k", KV), ("v", KV)))
            k, v = k.repeat_interleave(H // KV, 1), v.repeat_interleave(H // KV, 1)
            att = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd) + causal, -1) @ v
            x = x + rms(att.transpose(1, 2).reshape(x.shape) @ p("self_attn.o_proj").T, p("input_layernorm_2"))
            h = rms(x, p("post_attention_layernorm"))
            mlp = (torch.nn.functional.silu(h @ p("mlp.gate_proj").T) * (h @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
            x = x + rms(mlp, p("post_attention_layernorm_2"))
        x = rms(x, w["model.norm.weight"])
        logits.append(x @ w["lm_head.weight"].T)
        gates.append((x @ w["model.early_exit_gate.weight"].T + w["model.early_exit_gate.bias"]).squeeze(-1))
    return logits, gates


IDS = torch.tensor([AdditionTask().encode("1750+4733= 3846<eos>"), AdditionTask().encode("9999+0001= 0000<eos>")])


def test_export_holds_exactly_ouros_tensor_names_and_shapes(exported):
    config = json.loads((exported / "hf" / "config.json").read_text())
    assert config["model_type"] == "ouro" and config["total_ut_steps"] == 3 and config["num_key_value_heads"] == 2
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (32, 2, 48)
    assert config["rope_theta"] == 1e4 and config["vocab_size"] == AdditionTask().vocab_size
    tensors = load_file(exported / "hf" / WEIGHTS_NAME)
    assert {name: tuple(t.shape) for name, t in tensors.items()} == ouro_table(config)


def test_logits_equal_a_pure_torch_ouro_forward_from_the_safetensors_file(exported):
    model = load_model(str(exported / "hf"))
    with torch.no_grad():
        traj = model(IDS)
        ours = [model.logits(h) for h in traj.states]
        gates = [model.exit_logits(g) for g in traj.gate_inputs]
    ref_logits, ref_gates = ouro_reference(exported / "hf", IDS)
    for t in range(3):
        assert (ours[t] - ref_logits[t]).abs().max() < 1e-4, t
        assert (gates[t] - ref_gates[t]).abs().max() < 1e-4, t
    assert (ours[0] - ours[2]).abs().max() > 1e-3  # the loops differ: the check sees each of them


def test_the_export_holds_the_trained_weights(exported):
    state = checkpoint.load(exported / "run" / "checkpoint.pt")["model"]
    model = load_model(str(exported / "hf"))
    assert all(torch.equal(state[name], t) for name, t in model.state_dict().items())


def test_transformers_loads_the_export_without_remote_code(exported, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(exported / "hf")
    ids = tok(["1750+4733= 3846<eos>"], return_tensors="pt").input_ids
    assert ids.tolist() == IDS[:1].tolist()
    hf = AutoModelForCausalLM.from_pretrained(exported / "hf")
    ref_logits, _ = ouro_reference(exported / "hf", ids)
    with torch.no_grad():
        out = hf(ids, return_loop_logits=True)
    assert (out.logits - ref_logits[-1]).abs().max() < 1e-4
    assert all((a - b).abs().max() < 1e-4 for a, b in zip(out.loop_logits, ref_logits))
    hf.save_pretrained(tmp_path / "again")  # save_pretrained writes Ouro's layout too
    again = load_file(tmp_path / "again" / WEIGHTS_NAME)
    original = load_file(exported / "hf" / WEIGHTS_NAME)
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in original)


def test_import_then_export_is_bit_identical_sharded_too(exported, tmp_path):
    export_run(exported / "run", tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "sharded" / WEIGHTS_NAME).exists()
    original = load_file(exported / "hf" / WEIGHTS_NAME)
    for source in (exported / "hf", tmp_path / "sharded"):
        model = load_model(str(source))
        out = tmp_path / f"out-{source.name}"
        checkpoint.save(tmp_path / "ck.pt", {"model": model.state_dict(), "model_config": model.cfg.__dict__})
        export_run(tmp_path / "ck.pt", out, tokenizer=False)
        back = load_file(out / WEIGHTS_NAME)
        assert back.keys() == original.keys()
        assert all(torch.equal(back[k], original[k]) and back[k].dtype == original[k].dtype for k in original)


def test_training_from_an_ouro_folder_keeps_its_config_vocabulary_and_weights(exported, tmp_path):
    source = ouro_checkpoint(str(exported / "hf"))
    summary = fit(tmp_path / "stage2", steps=3, init_from=source, model_config=None,
                  recipe=Recipe(estimator=GateTraining(), prior=NoPrior()))
    assert summary["status"] == "complete"
    saved = checkpoint.load(tmp_path / "stage2" / "checkpoint.pt")
    assert saved["model_config"]["n_kv_heads"] == 2 and saved["model_config"]["vocab_size"] == 15
    start = load_model(str(exported / "hf")).state_dict()
    changed = sorted(k for k in start if not torch.equal(start[k], saved["model"][k]))
    assert changed == ["gate.bias", "gate.weight"]  # all else is the folder's, untouched by Stage II


def test_a_tied_head_exports_as_tie_word_embeddings_and_bfloat16_as_asked(tmp_path):
    cfg = model_config(**TINY | {"tie_head": True})
    state = LoopLM(cfg).state_dict()
    export_model(cfg, state, tmp_path / "hf", dtype="bfloat16")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"] is True
    tensors = load_file(tmp_path / "hf" / WEIGHTS_NAME)
    assert "lm_head.weight" not in tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    model = load_model(str(tmp_path / "hf"))
    assert model.lm_head.weight is model.embed.weight
    assert all(torch.equal(t, state[k].bfloat16().float()) for k, t in model.state_dict().items())


def test_transformers_refuses_a_padding_mask(exported):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(exported / "hf")
    hf(IDS, attention_mask=torch.ones_like(IDS))  # nothing hidden: fine
    with pytest.raises(ValueError, match="padded batches are not supported"):
        hf(IDS, attention_mask=torch.ones_like(IDS).index_fill(1, torch.tensor([0]), 0))


def test_a_task_whose_vocabulary_does_not_fit_the_imported_model_is_an_error(exported, tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=15 is fixed but ManoTask has \d+ tokens"):
        fit(tmp_path / "mano", task=ManoTask(n_eval=8), init_from=ouro_checkpoint(str(exported / "hf")),
            model_config=None)


def test_a_model_config_that_contradicts_the_folder_is_an_error(exported, tmp_path):
    with pytest.raises(ValueError, match=r"differs from .*config\.json.: d_model=64 \(the checkpoint has 32\)"):
        fit(tmp_path / "x", init_from=ouro_checkpoint(str(exported / "hf")),
            model_config=model_config(**TINY | {"d_model": 64}))
    cfg = ouro_checkpoint(str(exported / "hf"), n_loops=6).config  # shape-keeping overrides apply
    assert cfg.n_loops == 6 and cfg.d_model == 32


def test_ouro_1_4b_config_json_reads_as_the_ouro_1_4b_preset():
    released = {"model_type": "ouro", "architectures": ["OuroForCausalLM"], "hidden_size": 2048,
                "num_hidden_layers": 24, "intermediate_size": 5632, "num_attention_heads": 16,
                "num_key_value_heads": 16, "head_dim": 128, "rms_norm_eps": 1e-06, "vocab_size": 49152,
                "max_position_embeddings": 65536, "rope_theta": 1000000.0, "tie_word_embeddings": False,
                "rope_scaling": None, "total_ut_steps": 4, "early_exit_threshold": 1.0, "hidden_act": "silu",
                "torch_dtype": "bfloat16", "use_cache": True, "bos_token_id": 0, "eos_token_id": 0}
    got, want = model_config_from(released), PRESETS["ouro_1_4b"]
    assert {k: v for k, v in vars(got).items() if k != "vocab_from_task"} == \
        {k: v for k, v in vars(want).items() if k not in ("vocab_from_task", "vocab_size")} | {"vocab_size": 49152}
    assert got.vocab_from_task is False


@pytest.mark.parametrize("order", ["stack", "interleave"])
def test_upcycling_repeats_the_layers(exported, order):
    small = load_model(str(exported / "hf"))
    big = upcycled_checkpoint(str(exported / "run"), repeats=2, order=order)  # a looplm run as the source
    assert big.config.n_layers == 4 and big.config.d_model == 32
    state, origin = big.state_dict(), {"stack": [0, 1, 0, 1], "interleave": [0, 0, 1, 1]}[order]
    for i, j in enumerate(origin):
        layer = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"layers.{i}.")}
        assert layer and all(torch.equal(v, small.state_dict()[f"layers.{j}.{k}"]) for k, v in layer.items())
    model = LoopLM(big.config)
    model.load_state_dict(state)
    with torch.no_grad():  # the big model = the small model's layer modules run in `origin` order
        ctx, x = small.context(IDS.shape[1]), small.embed(IDS)
        for _ in range(3):
            for j in origin:
                x = small.layers[j](x, ctx.rope, ctx.mask)
            x = small.final_norm(x)
        assert (model.logits(model(IDS).states[-1]) - small.logits(x)).abs().max() < 1e-5


def test_training_from_an_upcycled_ouro_folder(exported, tmp_path):
    summary = fit(tmp_path / "big", steps=3, model_config=None,
                  init_from=upcycled_checkpoint(str(exported / "hf"), repeats=3, order="interleave"))
    assert summary["status"] == "complete"
    assert checkpoint.load(tmp_path / "big" / "checkpoint.pt")["model_config"]["n_layers"] == 6


def broken_copy(exported, tmp_path, edit_tensors=None, edit_config=None) -> str:
    folder = tmp_path / "broken"
    shutil.copytree(exported / "hf", folder)
    if edit_tensors:
        tensors = load_file(folder / WEIGHTS_NAME)
        edit_tensors(tensors)
        save_file(tensors, folder / WEIGHTS_NAME)
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("tensors, config, message", [  # (also through transformers: *)
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), None, r"missing 1: model\.layers\.1\.mlp\.up_proj"),
    (lambda t: t.update(extra=torch.zeros(2)), None, r"unexpected 1: extra"),
    (lambda t: t.update({"model.norm.weight": torch.ones(31)}), None,
     r"model\.norm\.weight has shape \(31,\), the config\.json describes \(32,\)"),
    (None, lambda c: c.update(num_experts=8), r"unsupported field\(s\) \['num_experts'\]"),  # *
    (None, lambda c: c.update(hidden_act="gelu"), r"hidden_act='gelu' is not supported: allowed are 'silu'"),  # *
    (None, lambda c: c.update(model_type="llama"), r"model_type='llama': allowed is 'ouro'"),
    (None, lambda c: c.pop("hidden_size"), r"lacks \['hidden_size'\]"),
], ids=["missing tensor", "unexpected tensor", "wrong shape", "unknown field", "unsupported value",
        "other model type", "missing field"])
def test_a_folder_that_does_not_fit_is_a_clear_error(exported, tmp_path, tensors, config, message):
    path = broken_copy(exported, tmp_path, tensors, config)
    with pytest.raises(LayoutError, match=message):
        load_model(path)
    if "num_experts" in message or "gelu" in message:  # * (transformers fills a missing field by a default)
        from transformers import AutoModelForCausalLM
        with pytest.raises(LayoutError, match=message):  # transformers' path checks the same
            AutoModelForCausalLM.from_pretrained(path)


def test_features_ouros_layout_lacks_are_refused_on_export(tmp_path, capsys):
    fit(tmp_path / "run", steps=3, model_config=model_config(**TINY | {"input_injection": "add", "n_prelude": 1}))
    assert export_main([str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "cannot export to Ouro's layout: n_prelude=1, input_injection='add'" in err
    assert not (tmp_path / "out" / WEIGHTS_NAME).exists()
    assert export_main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "no looplm checkpoint there" in capsys.readouterr().err


def test_a_hub_id_is_found_in_the_local_cache_and_never_downloaded(exported, tmp_path):
    snapshot = tmp_path / "models--someone--tiny-ouro" / "snapshots" / "0123abcd"
    shutil.copytree(exported / "hf", snapshot)
    (tmp_path / "models--someone--tiny-ouro" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-ouro" / "refs" / "main").write_text("0123abcd")
    assert locate("someone/tiny-ouro", str(tmp_path)) == snapshot
    assert ouro_checkpoint("someone/tiny-ouro", cache_dir=str(tmp_path)).config.d_model == 32
    with pytest.raises(FileNotFoundError, match="not in the local Huggingface cache"):
        locate("someone/absent", str(tmp_path))


@pytest.mark.parametrize("task", [AdditionTask(n_eval=8), ManoTask(n_eval=8)], ids=["addition", "mano"])
def test_the_vocabulary_tokenizer_gives_the_tasks_own_ids(task, tmp_path):
    vocab = [task.decode([i]) if i != task.pad_id else "<pad>" for i in range(task.vocab_size)]
    tok = vocabulary_tokenizer(vocab)
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.convert_ids_to_tokens(list(range(len(vocab)))) == vocab
    batch = task.train_batch(0, 4)
    for row in batch.input_ids:
        ids = [int(i) for i in row if i != task.pad_id]
        text = task.decode(ids)
        assert tok(text, add_special_tokens=False).input_ids == ids
        assert tok.decode(ids) == text


def test_a_runs_hf_tokenizer_is_exported_as_it_is(tmp_path):
    from transformers import AutoTokenizer
    vocabulary_tokenizer(["<pad>", "<eos>", "hello", "world"]).save_pretrained(tmp_path / "tok")  # any HF tokenizer
    record = "TextTask" + repr({"tokenizer_name": str(tmp_path / "tok"), "hf_cache_dir": None, "seq_len": 8})
    assert "HF tokenizer" in save_tokenizer(record, tmp_path / "out")
    exported, original = AutoTokenizer.from_pretrained(tmp_path / "out"), AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert exported.get_vocab() == original.get_vocab() and exported("hello world").input_ids == [2, 3]


OURO_CODE = os.environ.get("OURO_MODELING_DIR")  # a folder with Ouro's modeling_ouro.py + configuration_ouro.py
OURO_RUN = """
import sys, torch
from transformers import AutoModelForCausalLM
folder, ids, out = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
assert type(model).__module__.endswith("modeling_ouro"), type(model).__module__
with torch.no_grad():
    torch.save([model(torch.load(ids), use_cache=False, exit_at_step=t).logits
                for t in range(model.config.total_ut_steps)], out)
"""


@pytest.mark.skipif(not OURO_CODE, reason="Ouro's modeling code is remote code on the Huggingface hub (not "
                    "installable from PyPI, never vendored here): set OURO_MODELING_DIR to a folder holding its "
                    "modeling_ouro.py and configuration_ouro.py, and OURO_PYTHONPATH to a transformers it runs "
                    "on (it fails on transformers 5: ROPE_INIT_FUNCTIONS has no 'default')")
def test_ouros_own_modeling_code_gives_the_same_logits(exported, tmp_path):
    """In a separate process (no looplm.io there: its registration would take precedence over the
    remote code), with Ouro's code copied next to the export and named by auto_map."""
    import subprocess
    import sys
    folder = tmp_path / "with-code"
    shutil.copytree(exported / "hf", folder)
    for name in ("modeling_ouro.py", "configuration_ouro.py"):
        shutil.copy(Path(OURO_CODE) / name, folder / name)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_ouro.OuroConfig",
                          "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(IDS, tmp_path / "ids.pt")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("OURO_PYTHONPATH"),
                                                                     os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", OURO_RUN, str(folder), str(tmp_path / "ids.pt"),
                           str(tmp_path / "theirs.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = torch.load(tmp_path / "theirs.pt")
    ref_logits, _ = ouro_reference(exported / "hf", IDS)
    model = load_model(str(exported / "hf"))
    with torch.no_grad():
        ours = [model.logits(h) for h in model(IDS).states]
    assert len(theirs) == 3
    for t in range(3):
        assert (theirs[t] - ours[t]).abs().max() < 1e-4 and (theirs[t] - ref_logits[t]).abs().max() < 1e-4

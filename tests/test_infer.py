"""looplm.infer: the preallocated KV cache, batched generation and early exit that skips compute,
each checked against a second, independent computation (full forward passes, or a batch-of-one
decode on the core's concatenating KVCache)."""

import json
import re

import pytest
import torch

from looplm.config import model_config
from looplm.exits import LoopByLoop, QExit, StateChangeExit, StaticExit, default_rules
from looplm.infer import MODES, StaticKVCache, generate
from looplm.model import KVCache, LoopLM
from looplm.infer.cache import LOOPED_STAGES, runs_of

PROMPTS = [[5, 9, 2], [1, 2, 3, 4, 5, 6, 7], [30, 11, 4, 8, 2]]


def make_model(seed=0, **overrides):
    """A tiny float64 model with a gate whose exit probabilities vary from token to token."""
    torch.manual_seed(seed)
    model = LoopLM(model_config("tiny", vocab_size=32, init_std=0.3, **overrides)).double().eval()
    with torch.no_grad():
        model.gate.weight.normal_(0, 0.3)
    return model


def full_pass_argmax(model, tokens, n_loops, loop=None):
    traj = model(torch.tensor([tokens]), n_loops=n_loops)
    return int(model.logits(traj.states[(loop or n_loops) - 1][0, -1]).argmax())


@pytest.mark.parametrize("n_loops", [None, 5])
@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 2}, {"n_prelude": 1, "n_coda": 1},
                                       {"input_injection": "add"}])
def test_greedy_generation_equals_argmax_of_full_passes(n_loops, overrides):
    model = make_model(**overrides)
    T = n_loops or model.cfg.n_loops
    for prompts in (PROMPTS, [p[:3] for p in PROMPTS]):  # left padded, and unpadded (no mask)
        check_greedy(model, prompts, n_loops, T)


def check_greedy(model, prompts, n_loops, T):
    out = generate(model, prompts, max_new_tokens=6, n_loops=n_loops)
    with torch.no_grad():
        for prompt, new in zip(prompts, out.tokens):
            assert len(new) == 6
            for j, token in enumerate(new):
                assert token == full_pass_argmax(model, prompt + new[:j], T)
    assert out.mean_loops == T and out.loops_computed == 6 * len(prompts) * T


def test_teacher_forced_predictions_are_the_argmax_of_one_full_pass():
    """Forced continuations of different lengths: every prediction is the full pass's argmax at
    its position, and each row stops after its continuation."""
    model = make_model()
    forced = [[7, 3, 1, 9], [2], [4, 4, 8, 1, 6, 0]]
    out = generate(model, PROMPTS, max_new_tokens=6, forced=forced)
    with torch.no_grad():
        for prompt, cont, new in zip(PROMPTS, forced, out.tokens):
            traj = model(torch.tensor([prompt + cont]), n_loops=model.cfg.n_loops)
            full = model.logits(traj.states[-1][0]).argmax(-1).tolist()
            assert new == full[len(prompt) - 1:len(prompt) - 1 + len(cont)]
    assert out.loops_computed == sum(map(len, forced)) * model.cfg.n_loops


@pytest.mark.parametrize("rule", [QExit(0.6), StateChangeExit(0.9)])
def test_forcing_a_rows_own_greedy_tokens_reproduces_its_generation(rule):
    """Teacher forcing with a row's own free-running tokens is that generation, exits and all."""
    model = make_model(n_coda=1)
    free = generate(model, PROMPTS, max_new_tokens=7, exit_rule=rule)
    forced = generate(model, PROMPTS, max_new_tokens=7, exit_rule=rule, forced=free.tokens)
    assert (forced.tokens, forced.exit_loops) == (free.tokens, free.exit_loops)
    assert forced.loops_computed == free.loops_computed < 7 * len(PROMPTS) * model.cfg.n_loops


def test_q_exit_at_one_equals_all_loops_token_for_token():
    model = make_model()
    full = generate(model, PROMPTS, max_new_tokens=8)
    q1 = generate(model, PROMPTS, max_new_tokens=8, exit_rule=QExit(1.0))
    assert q1.tokens == full.tokens
    assert q1.loops_computed == full.loops_computed and q1.mean_loops == model.cfg.n_loops


# -- the independent reference: one row at a time on the concatenating KVCache -----------------
def reference_generate(model, prompt, max_new, rule, T, mode):
    """Greedy, batch of one, through model.forward and the core's KVCache. Each token first runs
    all T loops on a copy of the cache to learn its exit loop e (the rule given all loops), then e
    loops on the real cache; loops e+1..T get loop e's new keys and values; sharing modes rewrite
    every loop's new entries with the last / first / mean over loops."""
    cache, ids, tokens, loops = KVCache(), torch.tensor([prompt]), [], []
    for n in range(max_new):
        trial = KVCache(dict(cache.slots))
        traj = model(ids, n_loops=T, cache=trial)
        gates = torch.stack([model.exit_logits(g) for g in traj.gate_inputs], -1)
        e = T if rule is None else int(rule.exit_loops(gates, traj.states)[0, -1])
        if n == 0:  # a prefill computes every loop
            cache, computed = trial, T
        else:
            traj, computed = model(ids, n_loops=e, cache=cache), e
        tokens.append(int(model.logits(traj.states[e - 1][0, -1]).argmax()))
        loops.append(e)
        S = ids.shape[1]
        stages = {(s[0], s[2]) for s in cache.slots if s[0] in LOOPED_STAGES}
        for stage, layer in stages:
            for loop in range(computed, T):
                k, v = cache.slots[(stage, computed - 1, layer)]
                cache.update((stage, loop, layer), k[:, :, -S:], v[:, :, -S:])
            if mode != "per_loop":
                new = [cache.slots[(stage, loop, layer)] for loop in range(T)]
                ks, vs = (torch.stack([kv[i][:, :, -S:] for kv in new]) for i in (0, 1))
                reduce = {"last": lambda x: x[-1], "first": lambda x: x[0], "average": lambda x: x.mean(0)}[mode]
                for loop in range(T):
                    k, v = cache.slots[(stage, loop, layer)]
                    cache.slots[(stage, loop, layer)] = (torch.cat([k[:, :, :-S], reduce(ks)], 2),
                                                         torch.cat([v[:, :, :-S], reduce(vs)], 2))
        ids = torch.tensor([[tokens[-1]]])
    return tokens, loops


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", [None, QExit(0.6), StateChangeExit(0.9), StaticExit(2)])
def test_batched_early_exit_equals_one_row_reference(mode, rule):
    model = make_model(n_coda=1) if mode == "per_loop" and rule is not None else make_model()
    T = model.cfg.n_loops
    out = generate(model, PROMPTS, max_new_tokens=7, exit_rule=rule, cache=mode)
    computed = 0
    with torch.no_grad():
        for prompt, new, loops in zip(PROMPTS, out.tokens, out.exit_loops):
            ref_tokens, ref_loops = reference_generate(model, prompt, 7, rule, T, mode)
            assert (new, loops) == (ref_tokens, ref_loops)
            computed += T + sum(ref_loops[1:])
    assert out.loops_computed == computed  # the loops after each exit were not run
    if rule is not None:
        assert out.mean_loops < T
    if rule is None and mode != "per_loop":  # sharing really changes what later tokens attend to
        assert out.tokens != generate(model, PROMPTS, max_new_tokens=7).tokens


def test_early_exit_on_unpadded_rows_equals_the_reference():
    """Equal prompt lengths take the unmasked attention path while rows leave the batch."""
    model = make_model()
    prompts = [p[:3] for p in PROMPTS]
    out = generate(model, prompts, max_new_tokens=6, exit_rule=QExit(0.6))
    with torch.no_grad():
        for prompt, new, loops in zip(prompts, out.tokens, out.exit_loops):
            assert (new, loops) == reference_generate(model, prompt, 6, QExit(0.6), model.cfg.n_loops, "per_loop")
    assert out.decode_mean_loops < model.cfg.n_loops


def test_live_rows_in_runs_with_gaps_attend_to_their_own_keys_and_mask():
    """Eight rows of eight prompt lengths: at some loop the live rows are not consecutive, so
    attention runs on several spans of the cache, each with its own rows' padding mask."""
    model = make_model()
    prompts = [[(7 * i + 3 * j) % 32 for j in range(i + 1)] for i in range(8)]
    out = generate(model, prompts, max_new_tokens=5, exit_rule=QExit(0.5))
    gaps = [n for n in range(1, 5) for t in range(1, model.cfg.n_loops)
            if len(runs_of([i for i, loops in enumerate(out.exit_loops) if loops[n] > t])) > 1]
    assert gaps  # the case this test is for did occur
    with torch.no_grad():
        for prompt, new, loops in zip(prompts, out.tokens, out.exit_loops):
            assert (new, loops) == reference_generate(model, prompt, 5, QExit(0.5), model.cfg.n_loops, "per_loop")


def test_skip_false_selects_the_same_tokens_and_computes_every_loop():
    model = make_model()
    rule = QExit(0.6)
    skipped = generate(model, PROMPTS, max_new_tokens=6, exit_rule=rule, cache="last")
    full = generate(model, PROMPTS, max_new_tokens=6, exit_rule=rule, cache="last", skip=False)
    assert full.mean_loops == model.cfg.n_loops > skipped.mean_loops
    assert full.exit_loops[0][0] == skipped.exit_loops[0][0]  # first token: same prefill


@pytest.mark.parametrize("rule", default_rules(4), ids=lambda r: f"{r.label[0]}={r.label[1]:g}")
@pytest.mark.parametrize("form", ["the rule's", "generic"])
def test_a_rule_asked_loop_by_loop_exits_where_it_does_given_all_loops(rule, form):
    """Also after some rows leave (keep), and with saturated gates (CDF 1 or 0 at once)."""
    g = torch.Generator().manual_seed(0)
    T = 4
    gates = torch.randn(6, 5, T, generator=g) * 2
    gates[0, 0], gates[1, 1] = 40.0, -40.0
    base = torch.randn(6, 5, 8, generator=g)
    states = [base + torch.randn(6, 5, 8, generator=g) * 0.4 / t for t in range(1, T + 1)]
    exits = rule.exit_loops(gates, states)
    asked = rule.loop_by_loop(T) if form == "the rule's" else LoopByLoop(rule, T)
    rows, got = torch.arange(6), torch.zeros(6, 5, dtype=torch.long)
    for t in range(1, T + 1):
        fired = asked.fired(t, states[t - 1][rows], gates[rows, :, t - 1] if asked.needs_gate else None)
        new = fired & (got[rows] == 0)
        got[rows] = torch.where(new, t, got[rows])
        if t == 2:  # rows 1 and 4 leave; the others are asked on
            stay = (rows != 1) & (rows != 4)
            asked.keep(stay)
            rows = rows[stay]
    assert torch.equal(got[rows], exits[rows])
    left = torch.tensor([1, 4])
    assert torch.equal(got[left], torch.where(exits[left] <= 2, exits[left], 0))


def test_a_static_exit_past_the_last_loop_is_refused():
    with pytest.raises(ValueError, match="StaticExit.loop=5 but the model runs 4 loops"):
        StaticExit(5).loop_by_loop(4)


# -- the cache itself ----------------------------------------------------------------------------
def test_cache_memory_per_mode_and_in_place_writes():
    model = make_model()
    cfg, T = model.cfg, model.cfg.n_loops
    sizes = {}
    for mode in MODES:
        out = generate(model, PROMPTS, max_new_tokens=4, cache=mode)
        sizes[mode] = out.cache_bytes
    per_slot = 2 * len(PROMPTS) * cfg.kv_heads * (7 + 4) * cfg.head_dim * 8  # keys + values, float64
    assert sizes["per_loop"] == T * cfg.n_layers * per_slot
    assert sizes["last"] == sizes["first"] == sizes["average"] == cfg.n_layers * per_slot
    cache = StaticKVCache(2, 5)
    cache.begin(2)
    k = torch.randn(2, 1, 2, 4)
    [(i, j, keys, _, mask)] = cache.view().update(("loop", 0, 0), k, k)
    assert keys.data_ptr() == cache.buffer(("loop", 0, 0), k)[0].data_ptr()  # a view, not a copy
    assert (i, j, mask) == (0, 2, None)
    view = cache.view(torch.tensor([1]))  # a subset of rows: it writes its own, attends to its own in place
    [(i, j, keys, _, _)] = view.update(("loop", 0, 0), 2 * k[1:], k[1:])
    buffer = cache.buffer(("loop", 0, 0), k)[0]
    assert (i, j) == (0, 1) and keys.data_ptr() == buffer[1:].data_ptr()
    assert torch.equal(buffer[1, :, :2], 2 * k[1]) and torch.equal(buffer[0, :, :2], k[0])
    cache.finish(torch.tensor([1, 1]), 1)
    cache.begin(3)
    with pytest.raises(ValueError, match="max_len=5"):
        cache.begin(4)


@pytest.mark.parametrize("rows", [[0], [3], [0, 1, 2], [1, 2, 5, 7, 8, 10], [0, 2, 4], list(range(9))])
def test_runs_of_rows_cover_each_row_once_in_order(rows):
    runs = runs_of(rows)
    assert [r + n for i, j, r in runs for n in range(j - i)] == rows  # query i is cache row rows[i]
    assert [i for i, _, _ in runs] == [0, *[j for _, j, _ in runs[:-1]]] and runs[-1][1] == len(rows)
    assert len(runs) == 1 + sum(b != a + 1 for a, b in zip(rows, rows[1:]))  # maximal runs


def test_left_padding_mask_and_positions():
    cache = StaticKVCache(2, 6, start=torch.tensor([2, 0]))
    mask = cache.valid_mask(3)[:, 0]
    assert mask[0].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert mask[1].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert cache.positions(3).tolist() == [[0, 0, 0], [0, 1, 2]]
    mask = StaticKVCache(2, 6, start=torch.tensor([2, 0])).valid_mask(4)[0, 0, 3]
    assert mask.tolist() == [False, False, True, True]
    assert StaticKVCache(2, 6).valid_mask(3) is None  # unpadded: SDPA's causal fast path


# -- stopping and sampling -----------------------------------------------------------------------
def test_each_row_stops_at_its_eos_and_the_others_go_on():
    model = make_model()
    free = generate(model, PROMPTS, max_new_tokens=6)
    eos = free.tokens[1][2]
    out = generate(model, PROMPTS, max_new_tokens=6, eos=eos)
    for row, new in zip(free.tokens, out.tokens):
        cut = row.index(eos) + 1 if eos in row else len(row)
        assert new == row[:cut]
    lengths = sorted(len(new) for new in out.tokens)
    assert lengths[0] <= 3 and lengths[-1] == 6 and out.loops_computed == model.cfg.n_loops * out.n_tokens


def test_sampling_top_k_one_is_greedy_and_a_seed_reproduces_a_draw():
    model = make_model()
    greedy = generate(model, PROMPTS, max_new_tokens=5)
    assert generate(model, PROMPTS, 5, temperature=1.0, top_k=1).tokens == greedy.tokens
    assert generate(model, PROMPTS, 5, temperature=1.0, top_p=1e-6).tokens == greedy.tokens
    draws = [generate(model, PROMPTS, 5, temperature=1.5, generator=torch.Generator().manual_seed(s)).tokens
             for s in (3, 3, 4)]
    assert draws[0] == draws[1] != draws[2]


@pytest.mark.parametrize("kwargs, message", [
    ({"prompts": []}, "non-empty list"), ({"prompts": [[1], []]}, "prompt 1 is empty"),
    ({"prompts": [[1, 99]]}, "token 99"), ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"cache": "shared"}, "cache='shared'"), ({"temperature": -1.0}, "temperature=-1.0"),
    ({"top_k": 0}, "top_k=0"), ({"top_p": 1.5}, "top_p=1.5"), ({"eos": 32}, "eos=32"),
    ({"n_loops": 0}, "n_loops=0"), ({"forced": [[1]]}, "one continuation per prompt (3)"),
    ({"forced": [[1], [], [2]]}, "continuation 1 is empty"), ({"forced": [[1], [40], [2]]}, "token 40"),
    ({"forced": [[1], [2], [3]], "schedule": "staggered"}, "schedule='lockstep', not 'staggered'")])
def test_bad_generation_arguments_are_named(kwargs, message):
    args = {"prompts": PROMPTS, "max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        generate(make_model(), **args)


# -- the decode benchmark ----------------------------------------------------------------------
def test_lockstep_bound_counts_each_loop_while_any_row_is_live():
    from looplm.infer.bench import lockstep_bound

    # decode tokens (1, 2) and (3, 1): loops 1-2 with 2 then 1 live rows, loops 1-3 with 2, 1, 1
    assert lockstep_bound([[4, 1, 3], [4, 2, 1]], fixed=10.0, per_row=1.0) == 5 * 10 + 7 * 1


def test_decode_benchmark_runs_small_and_agrees_with_the_concatenating_cache(tmp_path, capsys):
    from looplm.bench import main as bench

    def main(argv):  # the decode part of `python -m looplm.bench`
        return bench(["decode", *argv])

    out = tmp_path / "bench.json"
    code = main(["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64", "--n-loops", "3",
                 "--vocab", "32", "--batches", "1,2", "--long-batches", "2", "--prompt", "4", "--new", "3",
                 "--long", "10", "--repeats", "1", "--exit-batches", "2,1", "--serve-slots", "2",
                 "--serve-waves", "2", "--serve-new", "3", "--serve-repeats", "1", "--json", str(out),
                 "--plot", str(tmp_path / "decode.png")])
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["decode"]] == [1, 2]
    assert report["long"][0]["same_tokens"] is True  # both caches decode the same greedy tokens
    assert 0 < report["long"][0]["attention_share"] < 1
    memory = {r["mode"]: r["bytes"] for r in report["memory"]}
    assert memory["per_loop"] == 3 * memory["last"] == 3 * memory["average"]
    assert report["early_exit"][0]["rule"] == "all" and report["early_exit"][0]["mean_loops"] == 3
    for row in report["early_exit"]:  # batch 1 first; there each loop costs the same, so the bound is the ideal
        assert row["lockstep"] == pytest.approx(row["ideal"]) if row["batch"] == 1 else row["lockstep"] > 0
    assert [r["batch"] for r in report["early_exit"]][0] == 1
    serving = report["serving"]  # a queue of 4 prompts over 2 slots, every rule in both schedules
    assert {(r["rule"].split("=")[0], r["schedule"]) for r in serving} == \
        {(rule, s) for rule in ("all", "q_exit", "state_change") for s in ("lockstep", "staggered")}
    assert all(r["same_tokens"] and r["prompts"] == 4 for r in serving)
    assert serving[0]["schedule"] == "lockstep" and serving[0]["speedup"] == 1.0
    assert "| cache mode |" in capsys.readouterr().out
    assert (tmp_path / "decode.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["--prompt", "0"]) == 2
    assert main(["--preset", "tiny", "--n-heads", "5"]) == 2  # 5 heads do not divide the preset's width
    assert main(["--serve-waves", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --prompt=0 must be >= 1",
                                                            "error: ModelConfig.n_heads=5 must divide d_model=32 "
                                                            "(allowed: [1, 2, 4, 8, 16, 32])",
                                                            "error: --serve-waves=0 must be >= 1"]


def test_a_one_token_prompt_is_a_prefill_every_loop_runs():
    """Alone or next to longer prompts, a prompt's tokens run every loop (its keys at every loop
    computed); the rule selects the read-out loop of its first new token."""
    model = make_model()
    T = model.cfg.n_loops
    alone = generate(model, [[5]], 3, exit_rule=StaticExit(1))
    assert alone.prefill_loops == T and alone.loops_computed == T + 2 and alone.exit_loops == [[1, 1, 1]]
    beside = generate(model, [[5], [1, 2, 3]], 3, exit_rule=StaticExit(1))
    assert beside.tokens[0] == alone.tokens[0] and beside.prefill_loops == 2 * T

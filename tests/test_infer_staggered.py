"""looplm.infer.staggered: rows at their own loops of their own tokens, and a queue of prompts
over a fixed number of slots, checked against lockstep decoding and the one-row reference."""

import pytest
import torch

from looplm.exits import QExit, StateChangeExit, StaticExit
from looplm.infer import MODES, generate
from looplm.infer import staggered
from test_infer import make_model, reference_generate

# eleven prompts of one to five tokens: queues longer than the slots, prompts of one token too
QUEUE = [[(7 * i + 3 * j) % 32 for j in range(i % 5 + 1)] for i in range(11)]
RULES = [None, QExit(0.6), StateChangeExit(0.9), StaticExit(2)]


def outcome(out):
    return out.tokens, out.exit_loops, out.loops_computed


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("overrides", [{}, {"n_prelude": 1, "n_coda": 1, "input_injection": "add"},
                                       {"n_kv_heads": 2}])
def test_staggered_decoding_equals_lockstep_with_and_without_a_queue(mode, rule, overrides):
    model = make_model(**overrides)
    lockstep = outcome(generate(model, QUEUE, 7, exit_rule=rule, cache=mode))
    for slots in (None, 4, 1):
        assert outcome(generate(model, QUEUE, 7, exit_rule=rule, cache=mode, schedule="staggered",
                                slots=slots)) == lockstep
    assert outcome(generate(model, QUEUE, 7, exit_rule=rule, cache=mode, slots=3)) == lockstep  # lockstep in batches


def test_staggered_queue_equals_the_one_row_reference():
    model = make_model(n_coda=1)
    rule, T = QExit(0.6), model.cfg.n_loops
    out = generate(model, QUEUE, 6, exit_rule=rule, schedule="staggered", slots=3)
    with torch.no_grad():
        for prompt, new, loops in zip(QUEUE, out.tokens, out.exit_loops):
            assert (new, loops) == reference_generate(model, prompt, 6, rule, T, "per_loop")
    assert out.decode_mean_loops < T


def test_q_exit_at_one_staggered_equals_all_loops():
    model = make_model()
    assert generate(model, QUEUE, 6, exit_rule=QExit(1.0), schedule="staggered", slots=4).tokens == \
        generate(model, QUEUE, 6).tokens


class Ticks:
    """Counts the shared stack's applications (ticks, or lockstep loops) of decode steps and how
    many distinct loops the rows of each were at."""

    def __init__(self, model, monkeypatch):
        self.calls, self.mixed = 0, 0
        recurrence = model.recurrence

        def counted(x, ctx, loop=0):
            if x.shape[1] == 1:
                self.calls += 1
                blocks = getattr(ctx.cache, "blocks", [])
                self.mixed += len(blocks) > 1
            return recurrence(x, ctx, loop)

        monkeypatch.setattr(model, "recurrence", counted)


def test_rows_run_their_own_loops_and_a_queue_needs_fewer_ticks(monkeypatch):
    model = make_model()
    prompts = QUEUE * 3
    ticks = Ticks(model, monkeypatch)
    lock = generate(model, prompts, 8, exit_rule=QExit(0.5), slots=4)
    lock_calls, ticks.calls = ticks.calls, 0
    stag = generate(model, prompts, 8, exit_rule=QExit(0.5), schedule="staggered", slots=4)
    assert outcome(stag) == outcome(lock)
    assert ticks.mixed > 0  # ticks whose rows were at different loops did occur
    # the same loops computed, in fewer applications of the stack: no tick waits for a deep row
    assert ticks.calls < lock_calls
    rows_per_tick = (stag.loops_computed - stag.prefill_loops) / ticks.calls
    assert rows_per_tick > (lock.loops_computed - lock.prefill_loops) / lock_calls


def test_each_prompt_stops_at_its_eos_and_its_slot_takes_the_next():
    model = make_model()
    out = generate(model, QUEUE, 9, exit_rule=QExit(0.5), eos=5, schedule="staggered", slots=2)
    assert outcome(out) == outcome(generate(model, QUEUE, 9, exit_rule=QExit(0.5), eos=5))
    stopped = [new for new in out.tokens if len(new) < 9]
    assert stopped and all(new[-1] == 5 and 5 not in new[:-1] for new in stopped)


def test_sampling_staggered_top_k_one_is_greedy():
    model = make_model()
    greedy = generate(model, QUEUE, 5, exit_rule=QExit(0.6)).tokens
    draw = generate(model, QUEUE, 5, exit_rule=QExit(0.6), schedule="staggered", slots=3, temperature=0.8,
                    top_k=1, generator=torch.Generator().manual_seed(0))
    assert draw.tokens == greedy


@pytest.mark.parametrize("kwargs, message", [
    ({"schedule": "async"}, "schedule='async': allowed are"),
    ({"schedule": "staggered", "skip": False}, "needs skip=True"),
    ({"slots": 0}, "slots=0 must be"),
])
def test_bad_schedules_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(make_model(), QUEUE, 3, **kwargs)


def test_a_rule_asked_for_rows_at_mixed_loops_exits_where_it_does_given_all_loops():
    """Row b is at loop k - b % 3 + 1 of the k-th call, so one call asks rows at different loops,
    each with its own history: fired is the rule's exit_loops over all T loops, at each row's loop."""
    torch.manual_seed(0)
    T, B, d = 4, 6, 5
    gates, states = torch.randn(B, 1, T), [torch.randn(B, 1, d) for _ in range(T)]
    for rule in (QExit(0.5), QExit(0.9), StateChangeExit(1.0), StaticExit(3)):
        exits = rule.exit_loops(gates, states)[:, 0]
        asked = staggered.RowRule(rule, T, B)
        for k in range(T + 2):
            loops = torch.tensor([k - b % 3 + 1 for b in range(B)])
            rows = torch.nonzero((loops >= 1) & (loops <= T)).squeeze(1)
            t = loops[rows]
            state = torch.stack([states[j - 1][b] for b, j in zip(rows.tolist(), t.tolist())])
            gate = torch.stack([gates[b, :, j - 1] for b, j in zip(rows.tolist(), t.tolist())])
            assert len(set(t.tolist())) > 1 or k in (0, T + 1)
            assert torch.equal(asked.fired(rows, t, state, gate), (exits[rows] <= t) | (t == T))

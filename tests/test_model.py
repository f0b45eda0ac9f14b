"""The LoopLM against REFERENCE section 1, each fact checked a second, independent way.

Float64 comparisons use the independent implementations in tests/reference.py (explicit RoPE as a
complex rotation, naive masked-softmax attention, the sandwich layer written out) or the model's
own layers driven by hand, never the forward pass compared with itself.
"""

import pytest
import torch
import torch.nn as nn

import reference as ref
from looplm.config import PRESETS, model_config
from looplm.layers import Attention, RMSNorm, RotaryEmbedding, apply_rope
from looplm.model import KVCache, LoopLM

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


def make_model(seed=0, **overrides):
    """A tiny float64 model whose norm weights and gate bias are random too, so a norm or a bias
    that is skipped cannot hide behind an all-ones / all-zeros initialisation."""
    torch.manual_seed(seed)
    model = LoopLM(model_config("tiny", **overrides)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm_in.weight") or name.endswith("norm_out.weight") or name == "final_norm.weight":
                p.copy_(1 + 0.3 * torch.randn_like(p))
        model.gate.bias.fill_(0.37)
    return model


def random_ids(model, B=2, S=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (B, S), generator=g)


# -- the loop -----------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [1, 3])
def test_carried_state_is_final_norm_of_stack_output(T):
    """Drive model.layers by hand: x_t = final_norm(stack(x_{t-1})) is states[t-1], and T=1 is the
    stack run once plus the final norm."""
    model = make_model()
    ids = random_ids(model)
    traj = model(ids, n_loops=T)
    ctx = model.context(ids.shape[1], dtype=F64)
    x = model.embed(ids)
    for t in range(T):
        for layer in model.layers:
            x = layer(x, ctx.rope, ctx.mask)
        unnormed = x
        x = model.final_norm(x)
        torch.testing.assert_close(traj.states[t], x, **TIGHT)
        # discriminative: the un-normed stack output is not what is carried
        assert not torch.allclose(traj.states[t], unnormed, atol=1e-3)
    torch.testing.assert_close(traj.final_state, x, **TIGHT)
    assert traj.final_state.grad_fn is None


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_matches_independent_reference_forward(n_kv_heads):
    """States, gate logits and LM logits per loop equal a from-scratch float64 LoopLM (complex
    RoPE with a non-default base, naive attention, sandwich norms) -- including GQA."""
    model = make_model(n_kv_heads=n_kv_heads, rope_base=3000.0)
    assert model.cfg.kv_heads == (n_kv_heads or model.cfg.n_heads)
    assert_matches_reference(model, random_ids(model, S=13))


def assert_matches_reference(model, ids):
    """States, gate logits and LM logits of every loop against tests/reference.py."""
    traj = model(ids)
    states, gates, logits = ref.forward(model.cfg, ref.weights_of(model), ids, model.cfg.n_loops)
    for t in range(model.cfg.n_loops):
        torch.testing.assert_close(traj.states[t], states[t], **TIGHT)
        torch.testing.assert_close(model.exit_logits(traj.gate_inputs[t]), gates[t], **TIGHT)
        torch.testing.assert_close(model.logits(traj.states[t]), logits[t], **TIGHT)


@pytest.mark.parametrize("injection", ["add", "concat"])
def test_input_injection_matches_the_reference_and_trains_the_embedding_under_truncation(injection):
    model = make_model(input_injection=injection)
    ids = random_ids(model, S=9)
    assert_matches_reference(model, ids)
    assert model.num_params() == ref.param_count(model.cfg)
    # one-step gradient (only loop T keeps a graph): e still reaches it, so the embedding learns
    T = model.cfg.n_loops
    model(ids, first_grad_loop=T).states[-1].pow(2).sum().backward()
    got = model.embed.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    e = model.embed(ids)
    ctx = model.context(ids.shape[1], dtype=F64)
    ctx.injected = e.detach()
    x = torch.zeros_like(e)
    with torch.no_grad():
        for t in range(T - 1):
            x, _ = model.recurrence(x, ctx, t)
    ctx.injected = e
    model.recurrence(x, ctx, T - 1)[0].pow(2).sum().backward()
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, model.embed.weight.grad, **TIGHT)
    with pytest.raises(ValueError, match="LoopContext.injected"):
        model.recurrence(x, model.context(ids.shape[1], dtype=F64), 0)


def test_unknown_input_injection_is_named():
    with pytest.raises(ValueError, match="unknown input injection 'sum'.*'add', 'concat'"):
        make_model(input_injection="sum")


def test_gate_reads_the_normed_state():
    model = make_model()
    ids = random_ids(model)
    traj = model(ids)
    ctx = model.context(ids.shape[1], dtype=F64)
    x = model.embed(ids)
    for t in range(model.cfg.n_loops):
        z = x
        for layer in model.layers:
            z = layer(z, ctx.rope, ctx.mask)
        x = model.final_norm(z)
        by_hand = (x @ model.gate.weight.T).squeeze(-1) + model.gate.bias
        torch.testing.assert_close(traj.gate_inputs[t], x, **TIGHT)
        got = model.exit_logits(traj.gate_inputs[t])
        assert got.shape == ids.shape
        torch.testing.assert_close(got, by_hand, **TIGHT)
        unnormed = (z @ model.gate.weight.T).squeeze(-1) + model.gate.bias
        assert not torch.allclose(got.double(), unnormed, atol=1e-3)


def test_gate_logits_stay_float32_under_bf16_autocast():
    model = make_model().float()
    h = torch.randn(2, 5, model.cfg.d_model) * 3
    by_hand = h @ model.gate.weight[0] + model.gate.bias[0]  # float32, no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.exit_logits(h)
        rounded = model.gate(h).squeeze(-1)  # what the gate's linear gives under autocast
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, by_hand, rtol=1e-6, atol=1e-6)
    assert rounded.dtype == torch.bfloat16 and (rounded.float() - by_hand).abs().max() > 1e-3


def test_lm_head_untied_without_bias():
    model = make_model()
    assert model.lm_head.weight is not model.embed.weight
    assert model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()
    assert model.lm_head.bias is None
    state = torch.randn(3, model.cfg.d_model, dtype=F64)
    torch.testing.assert_close(model.logits(state), state @ model.lm_head.weight.T, **TIGHT)
    # the two matrices are trained separately: a gradient on the head does not touch the embedding
    model.logits(state).sum().backward()
    assert model.embed.weight.grad is None and model.lm_head.weight.grad is not None


def test_no_biases_in_attention_or_mlp():
    model = make_model(n_prelude=1, n_coda=1)
    biases = [name for name, _ in model.named_parameters() if "bias" in name]
    assert biases == ["gate.bias"]
    for layer in [*model.prelude, *model.layers, *model.coda]:
        linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
        assert len(linears) == 4  # qkv, o, gate_up, down
        assert all(m.bias is None for m in linears)


# -- RMSNorm -----------------------------------------------------------------------------------
def test_rmsnorm_float64_matches_formula():
    torch.manual_seed(0)
    norm = RMSNorm(24, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24))
    x = 3 * torch.randn(5, 7, 24, dtype=F64)
    torch.testing.assert_close(norm(x), ref.rms_norm(x, norm.weight, 1e-5), rtol=1e-12, atol=1e-12)


def test_rmsnorm_low_precision_goes_through_float32():
    """bf16 in: statistics in float32, cast to bf16, then times the bf16 weight -- bit for bit."""
    torch.manual_seed(0)
    d, eps = 64, 1e-6
    norm = RMSNorm(d, eps=eps).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(d))
    x = (2 * torch.randn(8, d)).to(torch.bfloat16)
    got = norm(x)
    x32 = x.float()
    want = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(torch.bfloat16) * norm.weight
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    # discriminative: computing the statistics in bf16, or applying the weight before the cast,
    # rounds differently somewhere
    in_bf16 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.weight
    weight_first = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.float()).to(torch.bfloat16)
    assert not torch.equal(got, in_bf16)
    assert not torch.equal(got, weight_first)
    # and the float64 formula agrees to bf16 precision
    torch.testing.assert_close(got.double(), ref.rms_norm(x, norm.weight, eps), rtol=2e-2, atol=2e-2)


def test_rmsnorm_fp16_does_not_overflow():
    """fp16 squares of 1000 overflow (65504 max); float32 statistics do not."""
    norm = RMSNorm(16).half()
    x = torch.full((2, 16), 1000.0, dtype=torch.float16)
    x[:, ::2] = -1000.0
    got = norm(x)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref.rms_norm(x, norm.weight, 1e-6), rtol=1e-3, atol=1e-3)


# -- RoPE and attention -------------------------------------------------------------------------
@pytest.mark.parametrize("base", [500.0, 1e6])
@pytest.mark.parametrize("start", [0, 17])
def test_rope_matches_complex_rotation(base, start):
    torch.manual_seed(0)
    hd, S = 16, 9
    rot = RotaryEmbedding(hd, base)
    positions = torch.arange(start, start + S)
    cos, sin = rot(positions, F64)
    x = torch.randn(2, 3, S, hd, dtype=F64)
    want = ref.rope(x, positions, base)
    torch.testing.assert_close(apply_rope(x, cos, sin), want, **TIGHT)
    # discriminative: the default base gives a different rotation
    other = ref.rope(x, positions, 10000.0)
    assert not torch.allclose(apply_rope(x, cos, sin), other, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tables_survive_casting_the_model(dtype):
    """After `model.to(bf16)` the rotation angles at long positions are still right (frequencies
    kept in a castable buffer would be rounded to bf16: angles off by radians at position 4000)."""
    model = LoopLM(model_config("tiny", d_model=64, n_heads=2, rope_base=1e6)).to(dtype)
    positions = torch.arange(0, 4096, 7)
    cos, sin = model.rotary(positions, dtype)
    hd = model.cfg.head_dim
    theta = torch.tensor([1e6 ** (-(2.0 * i) / hd) for i in range(hd // 2)], dtype=F64)
    angle = positions.to(F64)[:, None] * theta
    want_cos, want_sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3  # float32 angles near 4000 rad: ulp 2.4e-4
    assert cos.dtype == dtype
    torch.testing.assert_close(cos.double(), want_cos, rtol=0, atol=tol)
    torch.testing.assert_close(sin.double(), want_sin, rtol=0, atol=tol)


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_attention_module_matches_naive_attention(n_kv_heads):
    torch.manual_seed(0)
    cfg = model_config("tiny", d_model=32, n_heads=4, n_kv_heads=n_kv_heads, rope_base=2500.0)
    attn = Attention(cfg).double()
    rot = RotaryEmbedding(cfg.head_dim, cfg.rope_base).double()
    B, S = 2, 10
    x = torch.randn(B, S, cfg.d_model, dtype=F64)
    got = attn(x, rot(torch.arange(S), F64), None)
    nq, nkv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    w = attn.qkv.weight.detach()
    assert w.shape[0] == nq + 2 * nkv
    want = ref.attention(x, w[:nq], w[nq:nq + nkv], w[nq + nkv:], attn.o_proj.weight.detach(),
                         cfg.n_heads, cfg.kv_heads, cfg.rope_base)
    torch.testing.assert_close(got, want, **TIGHT)


# -- masks ---------------------------------------------------------------------------------------
def test_causality_future_tokens_do_not_leak():
    model = make_model()
    ids = random_ids(model, S=12)
    j = 7
    changed = ids.clone()
    changed[:, j:] = (changed[:, j:] + 5) % model.cfg.vocab_size
    a, b = model(ids), model(changed)
    for t in range(model.cfg.n_loops):
        torch.testing.assert_close(a.states[t][:, :j], b.states[t][:, :j], rtol=0, atol=1e-12)
        assert not torch.allclose(a.states[t][:, j:], b.states[t][:, j:], atol=1e-6)


def packed_batch(model):
    """Row 0: documents of lengths 4, 5, 3; row 1: 6, 6."""
    doc_ids = torch.tensor([[0] * 4 + [1] * 5 + [2] * 3, [0] * 6 + [1] * 6])
    return random_ids(model, B=2, S=12), doc_ids


def test_document_mask_isolates_documents():
    model = make_model()
    ids, doc_ids = packed_batch(model)
    changed = ids.clone()
    changed[0, 4:9] = (changed[0, 4:9] + 3) % model.cfg.vocab_size  # row 0, document 1
    changed[1, 0:6] = (changed[1, 0:6] + 3) % model.cfg.vocab_size  # row 1, document 0
    a, b = model(ids, doc_ids=doc_ids), model(changed, doc_ids=doc_ids)
    for t in range(model.cfg.n_loops):
        for row, untouched, touched in [(0, [*range(0, 4), *range(9, 12)], range(4, 9)),
                                        (1, range(6, 12), range(0, 6))]:
            torch.testing.assert_close(a.states[t][row, list(untouched)], b.states[t][row, list(untouched)],
                                       rtol=0, atol=1e-12)
            assert not torch.allclose(a.states[t][row, list(touched)], b.states[t][row, list(touched)], atol=1e-6)


def test_document_mask_equals_running_each_document_alone():
    """Causal + document mask == each document run separately from position 0 (RoPE is relative,
    so a document that starts later in the row sees the same rotations' differences)."""
    model = make_model()
    ids, doc_ids = packed_batch(model)
    packed = model(ids, doc_ids=doc_ids)
    ref_states = ref.forward(model.cfg, ref.weights_of(model), ids, model.cfg.n_loops, doc_ids)[0]
    for row in range(2):
        for d in doc_ids[row].unique().tolist():
            cols = (doc_ids[row] == d).nonzero().squeeze(1)
            alone = model(ids[row:row + 1, cols])
            for t in range(model.cfg.n_loops):
                torch.testing.assert_close(packed.states[t][row, cols], alone.states[t][0], rtol=1e-9, atol=1e-9)
                torch.testing.assert_close(packed.states[t][row, cols], ref_states[t][row, cols], **TIGHT)


# -- KV cache ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_kv_heads, injection", [(None, None), (2, None), (None, "concat")])
def test_kv_cache_prefill_then_decode_equals_full_forward(n_kv_heads, injection):
    model = make_model(n_kv_heads=n_kv_heads, input_injection=injection)
    T, N = model.cfg.n_loops, model.cfg.n_layers
    assert T == 3
    ids = random_ids(model, S=10)
    full = model(ids)
    k = 4
    cache = KVCache()
    with torch.no_grad():
        steps = [model(ids[:, :k], cache=cache)]
        assert len(cache.slots) == T * N  # one slot per (loop, layer): prefill needs every loop
        for j in range(k, ids.shape[1]):
            steps.append(model(ids[:, j:j + 1], cache=cache))
            assert cache.length == j + 1
    assert len(cache.slots) == T * N
    for slot, (kk, vv) in cache.slots.items():
        assert kk.shape[2] == vv.shape[2] == ids.shape[1], slot
    # different loops really hold different keys (no slot is shared across loops)
    loop_keys = [cache.slots[s][0] for s in sorted(cache.slots) if s[-1] == 0]
    assert len(loop_keys) == T and not torch.allclose(loop_keys[0], loop_keys[1])
    for t in range(T):
        decoded = torch.cat([s.states[t] for s in steps], dim=1)
        torch.testing.assert_close(decoded, full.states[t], rtol=1e-9, atol=1e-9)


# -- truncated backprop, depth extrapolation ----------------------------------------------------
def test_first_grad_loop_detaches_earlier_loops():
    model = make_model()
    ids = random_ids(model)
    T, first = 3, 2
    traj = model(ids, n_loops=T, first_grad_loop=first)
    assert traj.states[0].grad_fn is None and not traj.states[0].requires_grad
    assert all(traj.states[t].grad_fn is not None for t in range(first - 1, T))
    traj.states[-1].pow(2).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert "embed.weight" not in got  # the embedding feeds only the no-grad loop
    # by hand: loop 1 under no_grad, then loops 2..T with the graph
    model.zero_grad(set_to_none=True)
    ctx = model.context(ids.shape[1], dtype=F64)
    with torch.no_grad():
        x, _ = model.recurrence(model.embed(ids), ctx, 0)
    for t in range(first - 1, T):
        x, _ = model.recurrence(x, ctx, t)
    x.pow(2).sum().backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], **TIGHT)
    # first_grad_loop = T + 1: nothing keeps a graph
    none = model(ids, n_loops=T, first_grad_loop=T + 1)
    assert all(s.grad_fn is None for s in none.states)


def test_depth_extrapolation_and_prefix_property():
    model = make_model()
    ids = random_ids(model)
    T = model.cfg.n_loops
    longest = model(ids, n_loops=T + 3)
    assert len(longest.states) == T + 3
    assert all(torch.isfinite(s).all() for s in longest.states)
    ref_states = ref.forward(model.cfg, ref.weights_of(model), ids, T + 3)[0]
    torch.testing.assert_close(longest.states[-1], ref_states[-1], **TIGHT)
    for k in range(1, T + 3):
        short = model(ids, n_loops=k)
        for t in range(k):
            assert torch.equal(short.states[t], longest.states[t]), (k, t)


def test_keep_returns_only_requested_loops():
    model = make_model()
    ids = random_ids(model)
    traj = model(ids, keep=[2])
    full = model(ids)
    assert traj.states[0] is None and traj.states[2] is None
    assert torch.equal(traj.states[1], full.states[1])


def test_invalid_loop_arguments_raise():
    model = make_model()
    ids = random_ids(model)
    with pytest.raises(ValueError):
        model(ids, n_loops=0)
    with pytest.raises(ValueError):
        model(ids, n_loops=2, first_grad_loop=4)


# -- presets -------------------------------------------------------------------------------------
EXPECTED_SIZE = {"small": (100e6, 125e6), "medium": (380e6, 430e6),
                 "ouro_1_4b": (1.35e9, 1.5e9), "ouro_2_6b": (2.55e9, 2.75e9)}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_parameter_count(preset):
    cfg = model_config(preset)
    with torch.device("meta"):
        model = LoopLM(cfg)
    assert model.num_params() == ref.param_count(cfg) == sum(p.numel() for p in model.parameters())
    if preset in EXPECTED_SIZE:
        lo, hi = EXPECTED_SIZE[preset]
        assert lo <= model.num_params() <= hi, model.num_params()


def test_ouro_presets_match_the_released_shapes():
    a, b = model_config("ouro_1_4b"), model_config("ouro_2_6b")
    for cfg in (a, b):
        assert (cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.kv_heads, cfg.d_ff) == (2048, 16, 128, 16, 5632)
        assert (cfg.vocab_size, cfg.rope_base, cfg.norm_eps, cfg.n_loops) == (49152, 1e6, 1e-6, 4)
        assert cfg.gate_on_normed and cfg.carry_normed and not cfg.tie_head
        assert cfg.norm_placement == "sandwich_branch" and cfg.norm_type == "rmsnorm"
    assert (a.n_layers, b.n_layers) == (24, 48)
    small = model_config("small")
    assert (small.n_layers, small.d_model, small.n_heads, small.n_loops) == (6, 768, 12, 4)

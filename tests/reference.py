"""Independent float64 reference implementations, written from REFERENCE.md sections 1-3.

Nothing here calls the code under test: the model's weights are read out of its parameters
(`weights_of`, which is the one place that knows the fused qkv / gate_up layout) and everything
else is recomputed with explicit formulas, explicit masks and explicit loops over loops and heads.
Tests compare looplm against these.
"""

import torch

F64 = torch.float64


# -- model pieces (REFERENCE section 1) --------------------------------------------------------
def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight, all in float64."""
    x = x.to(F64)
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight.to(F64)


def rope(x, positions, base):
    """Split-half RoPE as a complex rotation: the pair (x_i, x_{i + d/2}) is the complex number
    x_i + i x_{i+d/2}, multiplied by exp(i * pos * base**(-2i/d)). x: (..., S, d); positions: (S,)."""
    d = x.shape[-1]
    half = d // 2
    x = x.to(F64)
    theta = torch.tensor([base ** (-(2.0 * i) / d) for i in range(half)], dtype=F64)
    angle = positions.to(F64)[:, None] * theta[None, :]  # (S, d/2)
    rot = torch.polar(torch.ones_like(angle), angle)  # exp(i angle), complex128
    z = torch.complex(x[..., :half], x[..., half:]) * rot
    return torch.cat([z.real, z.imag], dim=-1)


def allowed_mask(S, doc_ids=None):
    """(B or 1, S, S) boolean: query i may see key j iff j <= i and both lie in one document."""
    allowed = torch.zeros(1, S, S, dtype=torch.bool)
    for i in range(S):
        for j in range(i + 1):
            allowed[0, i, j] = True
    if doc_ids is not None:
        same = doc_ids[:, :, None] == doc_ids[:, None, :]
        allowed = allowed & same
    return allowed


def attention(x, wq, wk, wv, wo, n_heads, kv_heads, base, doc_ids=None, positions=None):
    """Naive multi-head attention: explicit per-head QK^T * head_dim**-0.5, explicit causal (and
    document) mask, explicit softmax. Query head h reads KV head h // (n_heads // kv_heads)."""
    B, S, _ = x.shape
    x = x.to(F64)
    hd = wq.shape[0] // n_heads
    positions = torch.arange(S) if positions is None else positions
    q = (x @ wq.to(F64).T).view(B, S, n_heads, hd)
    k = (x @ wk.to(F64).T).view(B, S, kv_heads, hd)
    v = (x @ wv.to(F64).T).view(B, S, kv_heads, hd)
    allowed = allowed_mask(S, doc_ids)
    group = n_heads // kv_heads
    heads = []
    for h in range(n_heads):
        qh = rope(q[:, :, h].unsqueeze(1), positions, base).squeeze(1)  # (B, S, hd)
        kh = rope(k[:, :, h // group].unsqueeze(1), positions, base).squeeze(1)
        vh = v[:, :, h // group]
        scores = torch.einsum("bid,bjd->bij", qh, kh) * hd ** -0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        m = scores.max(-1, keepdim=True).values
        e = torch.exp(scores - m)
        a = e / e.sum(-1, keepdim=True)
        heads.append(torch.einsum("bij,bjd->bid", a, vh))
    return torch.cat(heads, dim=-1) @ wo.to(F64).T


def swiglu(x, w_gate, w_up, w_down):
    g = x @ w_gate.to(F64).T
    return (g * torch.sigmoid(g) * (x @ w_up.to(F64).T)) @ w_down.to(F64).T


def weights_of(model):
    """The model's weights as float64 tensors, with the fused projections split by hand."""
    cfg = model.cfg
    hd = cfg.head_dim
    nq, nkv = cfg.n_heads * hd, cfg.kv_heads * hd
    layers = []
    for layer in model.layers:
        qkv = layer.attn.sublayer.qkv.weight.detach().to(F64)
        gu = layer.mlp.sublayer.gate_up.weight.detach().to(F64)
        layers.append({
            "norm1": layer.attn.norm_in.weight.detach().to(F64),
            "wq": qkv[:nq], "wk": qkv[nq:nq + nkv], "wv": qkv[nq + nkv:],
            "wo": layer.attn.sublayer.o_proj.weight.detach().to(F64),
            "norm2": layer.attn.norm_out.weight.detach().to(F64),
            "norm3": layer.mlp.norm_in.weight.detach().to(F64),
            "w_gate": gu[:cfg.d_ff], "w_up": gu[cfg.d_ff:],
            "w_down": layer.mlp.sublayer.down.weight.detach().to(F64),
            "norm4": layer.mlp.norm_out.weight.detach().to(F64),
        })
    return {
        "embed": model.embed.weight.detach().to(F64),
        "layers": layers,
        "final_norm": model.final_norm.weight.detach().to(F64),
        "gate_w": model.gate.weight.detach().to(F64),
        "gate_b": model.gate.bias.detach().to(F64),
        "head": model.lm_head.weight.detach().to(F64),
        "adapter": (model.inject.adapter.weight.detach().to(F64)
                    if model.inject is not None and hasattr(model.inject, "adapter") else None),
    }


def forward(cfg, w, input_ids, n_loops, doc_ids=None):
    """Ouro's LoopLM written out: per loop, the sandwich layers then the final norm; the normed
    state is carried, read by the gate and by the head. Returns (states, gate_logits, logits),
    lists over loops 1..n_loops. With cfg.input_injection the state starts at 0 and the
    embedding enters every loop."""
    eps = cfg.norm_eps
    e = w["embed"][input_ids]
    x = e if cfg.input_injection is None else torch.zeros_like(e)
    states, gates, logits = [], [], []
    for _t in range(n_loops):
        if cfg.input_injection == "add":  # every loop sees the embedding again
            x = x + e
        elif cfg.input_injection == "concat":  # Huginn: a linear adapter of [state; embedding]
            x = torch.cat([x, e], dim=-1) @ w["adapter"].T
        for lw in w["layers"]:
            a = attention(rms_norm(x, lw["norm1"], eps), lw["wq"], lw["wk"], lw["wv"], lw["wo"],
                          cfg.n_heads, cfg.kv_heads, cfg.rope_base, doc_ids)
            x = x + rms_norm(a, lw["norm2"], eps)
            m = swiglu(rms_norm(x, lw["norm3"], eps), lw["w_gate"], lw["w_up"], lw["w_down"])
            x = x + rms_norm(m, lw["norm4"], eps)
        x = rms_norm(x, w["final_norm"], eps)
        states.append(x)
        gates.append((x @ w["gate_w"].T).squeeze(-1) + w["gate_b"])
        logits.append(x @ w["head"].T)
    return states, gates, logits


def param_count(cfg):
    """Closed-form parameter count of an Ouro LoopLM from its config."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd + 2 * d * cfg.kv_heads * hd + cfg.n_heads * hd * d  # q, k, v, o
    mlp = 3 * d * cfg.d_ff  # gate, up, down
    per_layer = attn + mlp + 4 * d  # four RMSNorm weights
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_head else cfg.vocab_size * d
    n_layers = cfg.n_layers + cfg.n_prelude + cfg.n_coda
    adapter = 2 * d * d if cfg.input_injection == "concat" else 0
    return embed + head + n_layers * per_layer + d + (d + 1) + adapter  # final norm, gate, adapter


# -- exit distribution (REFERENCE section 2) ---------------------------------------------------
def exit_probs(gate_logits, n_loops=None):
    """p_t by explicit products over t: p_t = lambda_t prod_{j<t} (1 - lambda_j) for t < T and
    p_T = prod_{j<T} (1 - lambda_j). Differentiable; computed in float64. With fewer gate logits
    n than n_loops, every given loop is a t < T loop."""
    g = gate_logits.to(F64)
    n = g.shape[-1]
    T = n if n_loops is None else n_loops
    lam, stay = torch.sigmoid(g), torch.sigmoid(-g)  # 1 - sigmoid(g) == sigmoid(-g)
    out = []
    for t in range(n):
        survive = torch.ones_like(g[..., 0])
        for j in range(t):
            survive = survive * stay[..., j]
        out.append(survive if t == T - 1 else lam[..., t] * survive)
    return torch.stack(out, dim=-1)


def exit_cdf(gate_logits):
    """CDF(n) = 1 - prod_{j<=n} (1 - lambda_j) for n < T, CDF(T) = 1, by explicit loops."""
    g = gate_logits.to(F64)
    T = g.shape[-1]
    stay = torch.sigmoid(-g)
    out = []
    for n in range(T):
        prod = torch.ones_like(g[..., 0])
        for j in range(n + 1):
            prod = prod * stay[..., j]
        out.append(torch.ones_like(prod) if n == T - 1 else 1 - prod)
    return torch.stack(out, dim=-1)


def q_exit_loop(gate_logits, q):
    """First 1-based n with CDF(n) >= q, token by token in plain Python."""
    cdf = exit_cdf(gate_logits)
    flat = cdf.reshape(-1, cdf.shape[-1])
    loops = []
    for row in flat.tolist():
        loops.append(next(n + 1 for n, c in enumerate(row) if c >= q))
    return torch.tensor(loops).view(cdf.shape[:-1])


# -- objectives (REFERENCE section 3) ----------------------------------------------------------
def masked_mean(per_token, mask):
    m = mask.to(F64)
    return (per_token * m).sum() / m.sum()


def stage1(ce, gate_logits, mask, beta):
    """Token mean of sum_t p_t CE_t - beta * H(p), H(p) = -sum_t p_t log p_t (0 log 0 = 0)."""
    p = exit_probs(gate_logits)
    expected_ce = (p * ce.to(F64)).sum(-1)
    H = -torch.xlogy(p, p).sum(-1)
    return masked_mean(expected_ce - beta * H, mask)


def stage2(ce, gate_logits, mask, k=50.0, gamma=0.005):
    """(1/T) sum_{t=2..T} mean_i[-(w_t log(1 - lambda_t) + (1 - w_t) log lambda_t)] with
    w_t = sigmoid(k (max(0, CE_{t-1} - CE_t) - gamma)) from detached losses."""
    ce = ce.detach().to(F64)
    g = gate_logits.to(F64)
    T = g.shape[-1]
    total = torch.zeros((), dtype=F64)
    for t in range(1, T):  # 0-based t is loop t + 1 = 2..T
        improvement = torch.clamp(ce[..., t - 1] - ce[..., t], min=0.0)
        w = torch.sigmoid(k * (improvement - gamma))
        lam = torch.sigmoid(g[..., t])
        bce = -(w * torch.log(1 - lam) + (1 - w) * torch.log(lam))
        total = total + masked_mean(bce, mask)
    return total / T

"""Every variant family against the full-unroll baseline (Ouro Stage I, gin/full_unroll.gin),
each variant its own gin file, 3 seeds each, on the embedded addition task:

    loop count        random_loops     lognormal T per batch (STARS)
    backprop window   truncated        gradient through the last loop only (HRM)
    loss estimator    sampled_step     one loop t ~ q per batch, loops 1..t read out, CE_1 control variate
    exit prior        prior_geometric  KL to a geometric prior (PonderNet)
    regularizer       jacobian         power-iteration Jacobian penalty (STARS)
    model option      pre_norm         pre-norm residual placement instead of Ouro's sandwich
    compositions      stars, huginn    random loops + Jacobian; Poisson-lognormal T + last-2 window

    python -m looplm.sweep list sweeps/variants.py           # 9 variants x 3 seeds = 27
    sbatch sweeps/variants.slurm
"""

from looplm.lab import Bundle, Sweep

SWEEP = Sweep(
    name="variants",
    base=["gin/full_unroll.gin"],
    grid={
        "variant": {
            "full_unroll": Bundle(),  # the baseline: base only
            "random_loops": Bundle(gin=["gin/random_loops.gin"]),
            "truncated": Bundle(gin=["gin/truncated.gin"]),
            "sampled_step": Bundle(gin=["gin/sampled_step_gate.gin"]),
            "prior_geometric": Bundle(gin=["gin/prior_geometric.gin"]),
            "jacobian": Bundle(gin=["gin/jacobian.gin"]),
            "pre_norm": ["import variants.norms", 'model_config.norm_placement = "pre_norm"'],
            "stars": Bundle(gin=["gin/stars.gin"]),
            "huginn": Bundle(gin=["gin/huginn.gin"]),
        },
    },
    seeds=[0, 1, 2],
)

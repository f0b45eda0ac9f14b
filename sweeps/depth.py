"""Depth extrapolation: train at one loop count T, evaluate at every loop count 1..2T (the
trainer's default `train.eval_max_loops = 2T`), for T in {2, 4, 8}, with and without the STARS
Jacobian penalty (which should degrade less beyond the trained T), 3 seeds each.
`accuracy_vs_loops.png` of the collected results is the plot to read.

    python -m looplm.sweep list sweeps/depth.py              # 2 recipes x 3 depths x 3 seeds = 18
    sbatch sweeps/depth.slurm
"""

from looplm.lab import Bundle, Sweep

SWEEP = Sweep(
    name="depth",
    base=["gin/full_unroll.gin"],
    grid={
        "recipe": {
            "full_unroll": Bundle(),
            "jacobian": Bundle(gin=["gin/jacobian.gin"]),
        },
        "model_config.n_loops": [2, 4, 8],
    },
    seeds=[0, 1, 2],
)

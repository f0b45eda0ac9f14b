"""Ouro's exit-prior ablation (arXiv:2510.25741, Appendix A, Figure 10): the uniform prior
(entropy bonus, Ouro Stage I) against geometric priors (PonderNet, KL(p || geometric(lambda_p)))
for several lambda_p, across the prior weight beta, 3 seeds each, on the embedded 4-digit
addition task (gin/base.gin). Ouro found the uniform prior gives lower loss and a better
accuracy-vs-depth frontier; compare `exit mean` with accuracy in the collected table.

    python -m looplm.sweep list sweeps/prior_ablation.py     # 6 priors x 3 betas x 3 seeds = 54
    sbatch sweeps/prior_ablation.slurm
"""

from looplm.lab import Sweep

LAMBDAS = [0.1, 0.3, 0.5, 0.7, 0.9]  # Ouro's range, 0.1..0.9
BETAS = [0.01, 0.05, 0.1]  # Ouro: 0.1 in Stage I, 0.05 later

SWEEP = Sweep(
    name="prior_ablation",
    base=["gin/full_unroll.gin"],
    bind=["import variants.priors"],
    grid={
        "prior": {
            "uniform": "Recipe.prior = @UniformPrior()",
            **{f"geometric_{lam}": ["Recipe.prior = @GeometricPrior()", f"GeometricPrior.lambda_p = {lam}"]
               for lam in LAMBDAS},
        },
        # one beta for whichever prior the point uses
        "beta": {beta: [f"UniformPrior.beta = {beta}", f"GeometricPrior.beta = {beta}"] for beta in BETAS},
    },
    seeds=[0, 1, 2],
)

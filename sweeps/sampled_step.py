"""The sampled-step loss against full unroll on the default job (issue 13; the diffusion analogy's
question: what does training on one sampled loop per step buy at equal compute?), 3 seeds each:

    full_unroll       Ouro Stage I, every loop every step (gin/full_unroll.gin)
    plain             p_t / q_t CE_t: one loop t ~ Uniform(1..T) read out, no control variate
    control_variate   loops 1..t read out, CE_1 control variate (gin/sampled_step_gate.gin)
    clts              the same with the CLTS curriculum and Min-SNR (gin/sampled_step_clts.gin)
    gate_target       exit weights detached, the gate on Ouro's Stage II target (gin/sampled_step_stage2.gin)
    diffusion         fixed 1/T weights, no gate in the loss (gin/sampled_step.gin, the best found;
                      its Stage II, gin/stage2_gate.gin from the run, is not a task of this sweep)

Training FLOPs depend on the loops each step ran: sweeps/results/sampled_step/experiment.py
counts them for the same configurations; this sweep measures accuracy, tokens/s and wall time
on the real sbatch path.

    python -m looplm.sweep list sweeps/sampled_step.py           # 6 losses x 3 seeds = 18
    sbatch sweeps/sampled_step.slurm
"""

from looplm.lab import Bundle, Sweep

GATE = "gin/sampled_step_gate.gin"

SWEEP = Sweep(
    name="sampled_step",
    base=["gin/full_unroll.gin"],
    grid={
        "loss": {
            "full_unroll": Bundle(),
            "plain": Bundle(gin=[GATE], bind=['SampledStep.readout = "sampled"', 'SampledStep.baseline = "none"']),
            "control_variate": Bundle(gin=[GATE]),
            "clts": Bundle(gin=["gin/sampled_step_clts.gin"]),
            "gate_target": Bundle(gin=["gin/sampled_step_stage2.gin"]),
            "diffusion": Bundle(gin=["gin/sampled_step.gin"]),
        },
    },
    seeds=[0, 1, 2],
)

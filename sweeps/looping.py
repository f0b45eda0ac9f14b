"""Does looping help? (REFERENCE 7; Ouro Figures 6-7, and the finding that looped models beat
iso-parameter ones and match iso-FLOP ones on reasoning tasks.) The looped model of gin/base.gin
(1 shared layer x T = 4) against two non-looped ones, on the three embedded tasks, 3 seeds each:

    looped      1 layer, T = 4                  Ouro Stage I
    iso_param   1 layer, T = 1                  the same parameters, a quarter of the depth
    iso_flop    4 layers, T = 1                 the same body FLOPs per token, 4x the parameters

At T = 1 the Stage I loss is plain next-token cross-entropy (p_1 = 1, no entropy term).

    python -m looplm.sweep list sweeps/looping.py            # 3 tasks x 3 models x 3 seeds = 27
    sbatch sweeps/looping.slurm
"""

from looplm.lab import Bundle, Sweep

SWEEP = Sweep(
    name="looping",
    base=["gin/full_unroll.gin"],
    grid={
        "task": {
            "addition": Bundle(),  # gin/base.gin's default
            "mano": ["train.task = @ManoTask()"],
            "multihop": Bundle(gin=["gin/multihop.gin"]),
        },
        "model": {
            "looped": Bundle(),
            "iso_param": ["model_config.n_loops = 1"],
            "iso_flop": ["model_config.n_layers = 4", "model_config.n_loops = 1"],
        },
    },
    seeds=[0, 1, 2],
)

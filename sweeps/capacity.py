"""Does looping raise knowledge capacity? (Ouro's Capo experiment, arXiv:2510.25741, after
Allen-Zhu & Li, arXiv:2404.05405: about 2 bits of knowledge per parameter, looped or not, while
looping helps manipulate knowledge.) gin/capacity.gin's synthetic biographies memorised by the
looped model (1 shared layer x T = 4) and two non-looped ones, at three widths, 3 seeds each:

    looped      1 layer, T = 4        ~25k / 46k / 74k parameters at d_model 32 / 48 / 64
    iso_param   1 layer, T = 1        the same parameters, a quarter of the depth
    iso_flop    4 layers, T = 1       the same body FLOPs per token, ~62k / 130k / 223k parameters

d_ff scales with d_model as gin/base.gin's (344 at 128). The eval's `bits_per_param` (at the
trained T) is the figure to compare; looplm.data.biographies says how it is counted. The 2000
people hold 72k bits: at most 2.9 / 1.55 / 0.97 bits per parameter for the 1-layer models and
1.16 / 0.55 / 0.32 for the 4-layer ones, so only the smallest points are capacity-bound at Ouro's
2 bits per parameter; a short CPU run stays far below that everywhere (gin/capacity.gin).

    python -m looplm.sweep list sweeps/capacity.py           # 3 widths x 3 models x 3 seeds = 27
    sbatch sweeps/capacity.slurm
"""

from looplm.lab import Bundle, Sweep

SWEEP = Sweep(
    name="capacity",
    base=["gin/capacity.gin"],
    grid={
        "width": {
            "d32": ["model_config.d_model = 32", "model_config.d_ff = 86"],  # gin/capacity.gin's
            "d48": ["model_config.d_model = 48", "model_config.d_ff = 128"],
            "d64": ["model_config.d_model = 64", "model_config.d_ff = 172"],
        },
        "model": {
            "looped": Bundle(),
            "iso_param": ["model_config.n_loops = 1"],
            "iso_flop": ["model_config.n_layers = 4", "model_config.n_loops = 1"],
        },
    },
    seeds=[0, 1, 2],
)

"""The lab: sweeps over the core (declare, launch on Slurm or here, collect from Aim into tables
and plots). It depends on the core; the core never imports it.

    declaration.py  Sweep, Bundle: a grid of gin bindings times seeds, one task per point and seed
    paths.py        where a sweep writes (run folders, logs, results) and its Aim repo
    launch.py       a task's `python -m looplm.run` line, running it, chaining the collect job
    sweep_cli.py    `python -m looplm.sweep`
    aim_runs.py     runs read back from Aim, and which one counts per task
    groups.py       runs grouped by grid point across seeds
    tables.py       the mean ± std tables and the CSV
    plots.py        loss curves, accuracy per loop, exit distribution, early-exit frontier
    collect.py      `python -m looplm.analyze` (and `python -m looplm.sweep collect`)
"""

from looplm.lab.declaration import Bundle, Sweep

__all__ = ["Bundle", "Sweep"]

"""`python -m looplm.bench`: whole training steps of LoopLM recipes next to two Llama peers.

    configs.py   the configurations (recipes, peers), `register_config`, the bench shape
    flops.py     the analytic FLOP count of a step (model work and overhead)
    counting.py  a stand-in model that records what a step ran, for its FLOPs
    worker.py    one worker process: time a configuration's steps, or the matmul rate; profile
    summary.py   medians, clean steps, ratios to the peers, MFU, the targets
    report.py    the Markdown and rich tables
    cli.py       the command: workers spawned round-robin, the report written
"""

from looplm.tools.bench.configs import ConfigSpec, register_config

__all__ = ["ConfigSpec", "register_config"]

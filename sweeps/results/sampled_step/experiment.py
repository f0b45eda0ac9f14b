"""One training run of the sampled-step study, its curves kept in memory and written as JSON.

    OMP_NUM_THREADS=1 python sweeps/results/sampled_step/experiment.py OUT.json \
        --gin gin/sampled_step.gin --bind 'AdditionTask.n_digits = 2' ...

Records per step the train metrics (loss, exit entropy where the estimator reports it, the loops
run and read out) and per evaluation the held-out exact match per loop, the exit distribution
and its entropy, together with the training FLOPs so far (looplm.tools.bench.flops: body, read-out and gate
of the loops each step ran) and the wall time.
"""

import argparse
import json
import sys
from dataclasses import replace

import gin
from looplm.tools.bench.flops import ReadoutCall, looplm_step_flops
from looplm.run import parse_config
from looplm.train import RunControl, train
from looplm.tracking import Tracker


class MemoryTracker(Tracker):
    """Keeps what train() logs, instead of writing an Aim run; with `stop_at`, asks train() to
    stop (and checkpoint) after that many steps, as a pre-emption would."""

    def __init__(self, control: RunControl | None = None, stop_at: int | None = None):
        super().__init__(repo=None, enabled=False)
        self.train_rows, self.eval_rows, self.frontier = [], [], []
        self.control, self.stop_at = control, stop_at

    def log(self, metrics, step, context=None):
        rows = self.eval_rows if (context or {}).get("subset") == "eval" else self.train_rows
        rows.append({"step": step, **{k: v for k, v in metrics.items()}})
        if self.stop_at is not None and rows is self.train_rows and step + 1 >= self.stop_at:
            self.control.raised = f"--stop-at {self.stop_at}"

    def log_frontier(self, points, step):
        self.frontier = points  # the last evaluation's early-exit points


def step_flops(cfg, batch, seq_len, row, gate_only=False) -> float:
    """Model FLOPs of one logged training step, from the loops it ran and read out.

    gate_only (Stage II, GateTraining): the LM is frozen, so the body and the read-outs run
    forward only and only the gate's weight gets a gradient.
    """
    T = row.get("n_loops", cfg.n_loops)
    run = int(round(row.get("run_loops", T)))
    reads = row.get("read_loops", T)
    n = batch * seq_len
    readouts = [ReadoutCall(n, not gate_only, not gate_only, True)] * int(round(reads))
    gates = [ReadoutCall(n, not gate_only, True)] * run
    first_grad = run + 1 if gate_only else 1
    return looplm_step_flops(cfg, batch, seq_len, run, first_grad, None, readouts, gates).model


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--gin", action="append", default=[])
    parser.add_argument("--bind", action="append", default=[])
    parser.add_argument("--stop-at", type=int, help="stop after this step, keeping the schedule of "
                        "train.steps (the checkpoint there can start a Stage II)")
    args = parser.parse_args(argv)
    parse_config(args.gin, args.bind + ["train.progress = False", "train.checkpoint_every = 100000"])

    control = RunControl()
    tracker = MemoryTracker(control, args.stop_at)
    summary = train(tracker=tracker, existing="overwrite", control=control)
    task = gin.query_parameter("train.task").scoped_configurable_fn
    cfg = replace(gin.query_parameter("train.model_config").scoped_configurable_fn(),
                  vocab_size=task().vocab_size)
    task = task()
    batch = gin.query_parameter("train.batch_size")
    gate_only = gin.query_parameter("Recipe.estimator").configurable.wrapped.trains == "gate"
    total, cumulative = 0.0, {}
    for row in tracker.train_rows:
        total += step_flops(cfg, batch, task.seq_len, row, gate_only)
        cumulative[row["step"] + 1] = total
    for row in tracker.eval_rows:
        row["flops"] = cumulative[row["step"]]
    json.dump({"gin": args.gin, "bind": args.bind, "train": tracker.train_rows, "eval": tracker.eval_rows,
               "wall_time": summary["wall_time"], "flops": total, "frontier": tracker.frontier},
              open(args.out, "w"))
    final = tracker.eval_rows[-1]
    print(args.out, "EM", " ".join(f"{v:.3f}" for v in final["exact_match"][:cfg.n_loops]),
          "exit_p", " ".join(f"{v:.2f}" for v in final["exit_p"]), f"H {final['entropy']:.2f}",
          f"flops {total:.3g} wall {summary['wall_time']:.0f}s")


if __name__ == "__main__":
    sys.exit(main())

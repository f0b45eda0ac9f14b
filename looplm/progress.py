"""What a person watching a run sees: a rich progress bar (or log lines when not on a terminal)
and a summary table at the end."""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from looplm.exits import frontier_table


def _loops(values, fmt="{:.3f}") -> str:
    """Per-loop values: a list (every loop) or {loop: value} (the loops a sampled step read)."""
    if isinstance(values, dict):
        return " ".join(f"{t}:{fmt.format(v)}" for t, v in sorted(values.items()))
    return " ".join(fmt.format(v) for v in values)


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int, log_every: int, enabled: bool = True):
        self.console = Console(soft_wrap=True)  # batch logs: a long line stays one line
        self.log_every = log_every
        self.live = enabled and self.console.is_terminal
        self.enabled = enabled
        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TextColumn("elapsed"), TimeElapsedColumn(),
                            TextColumn("left"), TimeRemainingColumn(),
                            console=self.console, disable=not self.live)
        self.task = self.bar.add_task("train", total=total_steps, completed=start_step, status="")

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def start_at(self, step: int) -> None:
        """A resumed run's bar starts where its checkpoint is."""
        self.bar.update(self.task, completed=step)

    def update(self, step: int, metrics: dict) -> None:
        per_loop = f" | ce/loop {_loops(metrics['ce'])}" if metrics.get("ce") else ""  # none per sequence
        status = f"loss {metrics['loss']:.4f}{per_loop} | {metrics['tokens_per_s']:,.0f} tok/s"
        self.bar.update(self.task, completed=step + 1, status=status)
        if self.enabled and not self.live and (step + 1) % self.log_every == 0:
            self.note(f"step {step + 1}: {status}")

    def note(self, text: str) -> None:
        """A line that must reach a batch job's log file now, not when the buffer fills."""
        if self.enabled:
            self.console.print(text, highlight=False)
            self.console.file.flush()

    def summary(self, eval_metrics: dict, trained_loops: int) -> None:
        if not self.enabled or not eval_metrics:
            return
        table = Table(title="held-out evaluation per loop count")
        for col in ("loops", "ce", "token acc", "exact match", "exit p"):
            table.add_column(col, justify="right")
        exit_p = eval_metrics["exit_p"]
        for t, (ce, acc, em) in enumerate(zip(eval_metrics["ce"], eval_metrics["acc"],
                                               eval_metrics["exact_match"]), start=1):
            mark = " (trained)" if t == trained_loops else ""
            p = f"{exit_p[t - 1]:.3f}" if t <= len(exit_p) else "-"
            table.add_row(f"{t}{mark}", f"{ce:.4f}", f"{acc:.2%}", f"{em:.2%}", p)
        self.console.print(table)
        self.console.print(f"mean exit loop {eval_metrics['exit_mean']:.2f}, "
                           f"exit entropy {eval_metrics['entropy']:.3f} nats")
        if eval_metrics.get("exit_frontier"):
            self.console.print(frontier_table({"": eval_metrics["exit_frontier"]}))

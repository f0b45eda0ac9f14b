"""`python -m looplm.generate RUN_DIR --prompt ...` and `python -m looplm.eval RUN_DIR`: generation
and held-out accuracy by exit rule from a run folder. Bad input: one message, exit code 2."""

import argparse
import json
import sys

import torch

from looplm.checkpoint import CheckpointError
from looplm.exits import default_rules
from looplm.infer.cache import MODES
from looplm.infer.generate import SCHEDULES, generate
from looplm.infer.held_out import held_out_units, parse_rule, score
from looplm.infer.load import RunError, encode, load_run, parse_ids, set_threads


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder (train.run_dir) with config.gin and checkpoint.pt")
    parser.add_argument("--n-loops", type=int, help="loops T (default: the model's trained T)")
    parser.add_argument("--cache", default="per_loop", choices=MODES, help="KV sharing across loops")
    parser.add_argument("--schedule", default="lockstep", choices=SCHEDULES, help="lockstep: one token of "
                        "every row per step; staggered: each row at its own loop of its own token, a waiting "
                        "prompt taking the first free slot")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def _cell(column: str, value) -> str:
    if value is None:
        return "-"
    if column in ("rule", "setting"):
        return f"{value:g}" if column == "setting" else value
    return f"{value:.2%}" if "exact" in column or "acc" in column else f"{value:.2f}"


def _fail(error) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2


def generate_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m looplm.generate", description=
                                     "Generate from a trained LoopLM, with per-token early exit.")
    _common(parser)
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable: a batch)")
    parser.add_argument("--ids", action="append", default=[], help="prompt as token ids, e.g. '3 14 15'")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rule", default="all", help="exit rule NAME=VALUE (q_exit=0.9, static=2, "
                        "state_change=0.25) or 'all' (every loop; default)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-eos", action="store_true", help="do not stop at the task's EOS token")
    parser.add_argument("--slots", type=int, help="prompts decoding at once (default: all)")
    args = parser.parse_args(argv)
    try:
        set_threads(args.threads)
        rule = parse_rule(args.rule)
        if not args.prompt and not args.ids:
            raise RunError("give at least one --prompt TEXT or --ids 'ID ID ...'")
        model, task = load_run(args.run_dir)
        prompts = [encode(task, p) for p in args.prompt] + [parse_ids(i, model.cfg.vocab_size) for i in args.ids]
        eos = None if args.no_eos else getattr(task, "eos_id", None)
        out = generate(model, prompts, args.max_new_tokens, exit_rule=rule, n_loops=args.n_loops,
                       cache=args.cache, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       eos=eos, generator=torch.Generator().manual_seed(args.seed), schedule=args.schedule,
                       slots=args.slots)
    except (RunError, CheckpointError, ValueError) as error:
        return _fail(error)
    for prompt, new, loops in zip(prompts, out.tokens, out.exit_loops):
        print(f"{task.decode(prompt)!r} -> {task.decode(new)!r}  (exit loops {loops})")
    print(f"{out.n_tokens} tokens, {out.tokens_per_second:.1f} tokens/s, mean loops computed "
          f"{out.mean_loops:.2f}, KV cache {out.cache_bytes / 2**20:.2f} MiB ({args.cache})")
    return 0


def eval_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m looplm.eval", description=
                                     "Held-out accuracy of greedy generation by exit rule, with tokens/s and "
                                     "the mean loops actually computed.")
    _common(parser)
    parser.add_argument("--task", default="run", help="the task to score: 'run' (default) is the run's "
                        "own held-out set; a task name must be the run's task (its vocabulary)")
    parser.add_argument("--rule", action="append", default=[], help="exit rule NAME=VALUE or 'all' "
                        "(repeatable; default: every static loop, Q-exit 0.1..1.0, state change)")
    parser.add_argument("--max-examples", type=int, help="score only the first N held-out answers")
    parser.add_argument("--batch-size", type=int, default=256, help="answers decoding at once (the slots)")
    parser.add_argument("--select-only", action="store_true", help="also score each rule computing "
                        "every loop (the rule only selects): the accuracy cost of skipping")
    parser.add_argument("--teacher-forced", action="store_true", help="feed each answer's true tokens "
                        "(next-token accuracy through the same decode path, cache and skipped loops; "
                        "lockstep only): on text, where free-running greedy text soon diverges")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        set_threads(args.threads)
        rules = [parse_rule(r) for r in args.rule]
        if args.max_examples is not None and args.max_examples < 1:
            raise RunError(f"--max-examples={args.max_examples} must be >= 1")
        if args.batch_size < 1:
            raise RunError(f"--batch-size={args.batch_size} must be >= 1")
        model, task = load_run(args.run_dir)
        if args.task not in ("run", getattr(task, "name", "run")):
            raise RunError(f"--task {args.task!r}: this run trained on {task.name!r}; its model "
                           f"scores only that task (--task run or --task {task.name})")
        T = args.n_loops or model.cfg.n_loops
        rules = rules or [None, *default_rules(T)]
        if args.teacher_forced and args.schedule != "lockstep":
            raise RunError(f"--teacher-forced runs on --schedule lockstep, not {args.schedule!r}")
        units = held_out_units(task, args.max_examples)
        rows = []
        for rule in rules:
            name, setting = ("all", T) if rule is None else rule.label
            row = {"rule": name, "setting": setting,
                   **score(model, units, rule, T, args.batch_size, cache=args.cache, schedule=args.schedule,
                            teacher_forced=args.teacher_forced)}
            if args.select_only and rule is not None:
                selected = score(model, units, rule, T, args.batch_size, cache=args.cache, skip=False,
                                 teacher_forced=args.teacher_forced)
                row["exact_match_select_only"] = selected["exact_match"]
                row["token_acc_select_only"] = selected["token_acc"]
            rows.append(row)
    except (RunError, CheckpointError, ValueError) as error:
        return _fail(error)
    from rich.console import Console
    from rich.table import Table

    how = "teacher forced" if args.teacher_forced else "generated greedily"
    table = Table(title=f"{len(units)} held-out answers of {type(task).__name__}, {how}, "
                        f"T = {T}, cache {args.cache}, {args.schedule}")
    columns = ["rule", "setting", "exact_match", "token_acc", "mean_loops", "tokens_per_s"]
    columns += ["exact_match_select_only", "token_acc_select_only"] * args.select_only
    for col in columns:
        table.add_column(col.replace("_", " "), justify="left" if col == "rule" else "right")
    for row in rows:
        table.add_row(*(_cell(c, row.get(c)) for c in columns))
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0

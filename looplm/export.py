"""Command line: `python -m looplm.export RUN_DIR OUT_DIR` writes a looplm run's model in Ouro's
Huggingface layout (config.json with model_type "ouro", model.safetensors or shards with
model.safetensors.index.json, the tokenizer files). Load the folder with transformers after
`import looplm.io` (no remote code), or in looplm with `train.init_from = @ouro_checkpoint()`.

Exit codes: 0 written, 2 bad input (no checkpoint, a model Ouro's layout cannot describe, ...).
"""

import argparse
import sys

from looplm.io.export import DTYPES, export_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m looplm.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a looplm run folder (or its checkpoint.pt)")
    parser.add_argument("out_dir", help="the folder to write (created; weights there are replaced)")
    parser.add_argument("--max-shard-size", default="5GB",
                        help="shard the weights above this size, e.g. 5GB or 200MB (default 5GB)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weights' dtype")
    parser.add_argument("--exit-threshold", type=float, default=1.0,
                        help="config.json early_exit_threshold, the Q-exit q Ouro's code applies (default 1.0)")
    parser.add_argument("--max-position-embeddings", type=int, default=65536)
    parser.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    args = parser.parse_args(argv)
    try:
        written = export_run(args.run_dir, args.out_dir, args.max_shard_size, args.dtype, args.exit_threshold,
                             args.max_position_embeddings, tokenizer=not args.no_tokenizer)
    except (ValueError, FileNotFoundError) as err:
        print(f"export error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir}: {', '.join(written['weights'])}"
          + (f"; tokenizer: {written['tokenizer']}" if written["tokenizer"] else "; no tokenizer"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Early exit on text (issue 16's "token accuracy on text"): train a 2-layer x 4-loop LoopLM
# (Ouro Stage I, gin/full_unroll.gin) on Python standard-library source, then score the second
# half of each held-out row from its first half by exit rule, at 1, 8 and 64 rows decoding at once,
# with the skipped loops' KV copied (per_loop cache) and, beside each rule, the same rule only
# selecting: teacher forced (next-token accuracy through the decode path) and free-running greedy.
#
#     bash sweeps/decode_text/run.sh [OUT]    # OUT: runs/decode_text (about 30 min on 2 CPU cores)
#
# Data and tokenizer are made offline (sweeps/decode_text/data.py); results go to
# sweeps/results/decode/text_{forced,free}_batch{1,8,64}_<date>.json. Run from the repository root with the
# virtualenv active.
set -euo pipefail
OUT="${1:-runs/decode_text}"
UNITS="${LOOPLM_TEXT_UNITS:-128}"
export OMP_NUM_THREADS=1

[ -f "$OUT/tokenizer/tokenizer.json" ] || python sweeps/decode_text/data.py "$OUT"
python -m looplm.run --gin gin/full_unroll.gin \
  --bind 'train.task = @TextTask()' \
  --bind "TextTask.dataset = '$OUT/data'" --bind "TextTask.tokenizer = '$OUT/tokenizer'" \
  --bind "TextTask.cache_dir = '$OUT/tokens'" --bind 'TextTask.seq_len = 128' \
  --bind "TextTask.max_eval_blocks = $UNITS" \
  --bind 'model_config.d_model = 192' --bind 'model_config.n_layers = 2' \
  --bind 'model_config.n_heads = 4' --bind 'model_config.d_ff = 512' \
  --bind 'TRAIN_STEPS = 1200' --bind 'train.batch_size = 16' --bind 'train.checkpoint_every = 300' \
  --bind "train.run_dir = '$OUT/run'" --bind 'train.progress = False'

for batch in 1 8 64; do
  for mode in forced free; do
    python -m looplm.eval "$OUT/run" --threads 1 --batch-size "$batch" --max-examples "$UNITS" \
      $([ "$mode" = forced ] && echo --teacher-forced) \
      --select-only --rule all --rule q_exit=0.5 --rule q_exit=0.7 --rule q_exit=0.9 \
      --rule state_change=0.25 --json "sweeps/results/decode/text_${mode}_batch${batch}_$(date +%F).json"
  done
done

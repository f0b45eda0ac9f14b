#!/usr/bin/env bash
# The payload of every sweeps/*.slurm array task: run one task of a sweep, and survive pre-emption.
#
#   exec bash "$LOOPLM_ROOT/sweeps/task.sh" sweeps/prior_ablation.py     (the last line of a .slurm)
#
# - The first task of the array, on its first start, submits the collect job once, chained with
#   --dependency=afterok on the whole array (python -m looplm.sweep chain-collect).
# - The task runs `python -m looplm.sweep run SWEEP --task $SLURM_ARRAY_TASK_ID` in the background
#   and waits, so that the USR1 trap fires while it trains (bash runs traps only between commands).
# - On USR1 (sbatch --signal=B:USR1@120: two minutes before the time limit; or a pre-emption) it
#   forwards the signal to the trainer, which finishes its step, writes a checkpoint, closes its Aim
#   run and exits 3; the script then requeues the task (scontrol requeue). Started again, the task
#   resumes from the checkpoint into the same Aim run. A trainer that exits 3 on its own (it got
#   SIGTERM directly) is requeued the same way; so is any other exit after the signal but a config
#   error (a launcher such as torchrun exits 1 once its worker has checkpointed, srun
#   --kill-on-bad-exit may report a rank it ended as 143; a trainer still starting up dies of the
#   signal): the task resumes from its last checkpoint.
# - Exit codes: 0 done, 2 config error (never requeued), anything else the trainer's failure.
#
# Environment: LOOPLM_ROOT (repository, default $SLURM_SUBMIT_DIR), LOOPLM_PYTHON (default python),
# LOOPLM_LAUNCHER (a command prefix that starts the ranks of a multi-GPU task: `srun
# --kill-on-bad-exit=1`, or `srun ... torchrun ...`; see the .slurm files), LOOPLM_FORWARD_SIGNAL
# (the signal sent on, default USR1; TERM for a launcher that does not pass USR1 on: the trainer
# checkpoints on either), and the LOOPLM_SWEEP_* overrides of looplm/lab/sweep_cli.py.

# The whole script is one { ... } block, so bash reads all of it before running any: editing this
# file while a sweep runs cannot change what running tasks execute (bash reads scripts lazily).
{
set -uo pipefail

sweep=${1:?usage: task.sh SWEEP_FILE (from a sweeps/*.slurm array job)}
root=${LOOPLM_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
python=${LOOPLM_PYTHON:-python}
forward=${LOOPLM_FORWARD_SIGNAL:-USR1}
PREEMPTED=3  # looplm.train.PREEMPTED_EXIT_CODE

log() { echo "[task.sh $(date '+%F %T')] $*"; }

if [[ -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
    echo "task.sh: not a Slurm array task; run one task here with: python -m looplm.sweep run $sweep --task N" >&2
    exit 2
fi
cd "$root" || exit 2
[[ -f $sweep ]] || { log "no sweep file $sweep in $root: submit from the repository root or set LOOPLM_ROOT"; exit 2; }
# One task, its CPUs: torch would otherwise start a thread per core of the node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

task=$SLURM_ARRAY_TASK_ID
restarts=${SLURM_RESTART_COUNT:-0}
log "task ${SLURM_ARRAY_JOB_ID}_${task} (job $SLURM_JOB_ID) of $sweep on $(hostname), start $((restarts + 1))"

pid=
signaled=
on_signal() {
    signaled=$1
    if [[ -n $pid ]]; then
        log "got SIG$1: SIG$forward to the trainer (pid $pid), waiting for its checkpoint"
        kill -s "$forward" "$pid" 2>/dev/null
    else
        log "got SIG$1 before the trainer started"
    fi
}
trap 'on_signal USR1' USR1

requeue() {
    log "requeueing job $SLURM_JOB_ID: $1"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    log "scontrol requeue failed: resubmit the sweep later and this task resumes from its checkpoint"
    exit "$PREEMPTED"
}

if [[ $task == "${SLURM_ARRAY_TASK_MIN:-0}" && $restarts == 0 ]]; then
    # The collect log sits next to this task's log (Slurm's --output of the array).
    out=$(readlink -f "/proc/$$/fd/1" 2>/dev/null)
    log_dir=$([[ -f $out ]] && dirname "$out" || echo "$root")
    "$python" -m looplm.sweep chain-collect "$sweep" --after "$SLURM_ARRAY_JOB_ID" \
        --log "$log_dir/${SLURM_JOB_NAME}_${SLURM_ARRAY_JOB_ID}_collect.out" \
        || log "could not submit the collect job: run python -m looplm.sweep collect $sweep afterwards"
fi
[[ -z $signaled ]] || requeue "pre-empted before the trainer started"

# shellcheck disable=SC2086  # LOOPLM_LAUNCHER is a command prefix, split into words on purpose
${LOOPLM_LAUNCHER:-} "$python" -m looplm.sweep run "$sweep" --task "$task" &
pid=$!
# A trapped signal interrupts `wait` (status > 128): wait again until the trainer has exited, then
# once more for its exit status (bash keeps it).
wait "$pid"
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
wait "$pid"
rc=$?

if ((rc == 0)); then
    log "done"
    exit 0
elif ((rc == PREEMPTED)); then
    requeue "the trainer checkpointed and exited $PREEMPTED${signaled:+ after SIG$signaled}"
elif [[ -n $signaled ]] && ((rc != 2)); then
    # A launcher reports its own code (torchrun exits 1 after forwarding the signal), and a trainer
    # still starting up dies of the signal (128 + signal): either way the last checkpoint resumes.
    requeue "exit code $rc after SIG$signaled; the task resumes from its last checkpoint"
fi
log "the trainer failed with exit code $rc"
exit "$rc"
}

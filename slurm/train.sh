#!/bin/bash
# Train on a SLURM cluster: one task per GPU, ranks from the SLURM variables (no SSH needed).
#
#   sbatch slurm/train.sh CONFIG STORE [OUT]            # or set CONFIG / STORE / OUT in the env
#   sbatch --nodes=4 --gpus-per-node=8 --ntasks-per-node=8 slurm/train.sh configs/mtcmkd.yaml /data/brats2021.zarr
#
# Preemption and time limits: SLURM sends SIGUSR1 to every task 300 s before the limit
# (--signal); the run saves a checkpoint and exits with code 3, and this script requeues the
# job, which resumes from that checkpoint (same job id, same OUT, same log file). A SIGUSR1 to
# this batch shell (`scancel --signal=USR1 --full`, `--signal=B:USR1@300`) is passed on to the
# ranks. A rank lost mid-run (its node gone) ends the others within train.collective_timeout_s
# with the lost rank's host named; the job then fails, and submitting it again resumes it.
#
# MTCMKD_ARGS holds extra `mtcmkd train` options, e.g.
#   MTCMKD_ARGS='--set data.patch_size=[64,64,64] --set "train.note=two words"'
# It is split like a shell command line (quotes and backslashes honoured, by Python's
# shlex.split) but nothing in it is expanded or run: no globbing (a file named `6` in the
# submit folder cannot turn [64,64,64] into 6), no $VAR, no $(...). Unbalanced quotes stop the
# job with `error: MTCMKD_ARGS: ...` (exit 2) before anything starts.
#SBATCH --job-name=mtcmkd
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
set -euo pipefail

CONFIG=${CONFIG:-${1:-configs/mtcmkd.yaml}}
STORE=${STORE:-${2:?usage: sbatch slurm/train.sh CONFIG STORE [OUT]}}
OUT=${OUT:-${3:-runs/${SLURM_JOB_NAME:-mtcmkd}-${SLURM_JOB_ID:-local}}}
PYTHON=${MTCMKD_PYTHON:-python}          # e.g. /path/to/.venv/bin/python

# MTCMKD_ARGS -> one array element per word (see the header), NUL-separated so any character
# but NUL survives; `wait $!` collects the parser's exit status from the process substitution.
EXTRA_ARGS=()
if [ -n "${MTCMKD_ARGS:-}" ]; then
    mapfile -d '' -t EXTRA_ARGS < <("${PYTHON}" -c '
import shlex, sys
try:
    words = shlex.split(sys.argv[1])
except ValueError as exc:
    sys.exit(f"error: MTCMKD_ARGS: {exc} in {sys.argv[1]!r}")
sys.stdout.write("".join(word + "\0" for word in words))
' "${MTCMKD_ARGS}")
    wait $! || exit 2
fi

# Rendezvous on the first node of the allocation; a port derived from the job id.
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
# The restart count is part of the port: a requeued job must not race the sockets of its
# previous incarnation, which may still be closing.
MASTER_PORT=$((20000 + (${SLURM_JOB_ID} * 7 + ${SLURM_RESTART_COUNT:-0}) % 20000))
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

RESUME=()
if [ -f "${OUT}/checkpoints/latest" ]; then
    RESUME=(--resume)
fi
echo "[$(date -Is)] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NTASKS} tasks on" \
     "${SLURM_JOB_NUM_NODES} node(s), master ${MASTER_ADDR}:${MASTER_PORT}, out ${OUT} ${RESUME[*]}"

# srun in the background, so that this shell can pass the warning on: `scancel --full` and
# `--signal=B:USR1@...` signal this batch shell too (or only it), and bash's default for SIGUSR1
# is to exit, which would end the job before the ranks' checkpoint and the requeue below.
srun --kill-on-bad-exit=1 "${PYTHON}" -m mtcmkd train --config "${CONFIG}" --store "${STORE}" \
    --out "${OUT}" "${RESUME[@]}" "${EXTRA_ARGS[@]}" &
SRUN_PID=$!
trap 'kill -USR1 "${SRUN_PID}" 2>/dev/null || true' USR1  # srun forwards it to every rank
while :; do  # a trapped signal ends `wait` early (status 138): wait until srun is gone
    rc=0
    wait "${SRUN_PID}" || rc=$?
    kill -0 "${SRUN_PID}" 2>/dev/null || break
done
rc=0
wait "${SRUN_PID}" || rc=$?  # srun's own status, also when it ended during the trap
trap - USR1
# Exit code 3 means "checkpoint saved after the warning, requeue me". With --kill-on-bad-exit,
# srun may kill the other ranks once the first exits 3 and report their signal instead; every
# rank passes a barrier after the run folder's PREEMPTED marker is written, so trust it too.
if [ "${rc}" -eq 3 ] || { [ "${rc}" -ne 0 ] && [ -f "${OUT}/PREEMPTED" ]; }; then
    echo "[$(date -Is)] checkpoint saved after the warning signal; requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
fi
exit "${rc}"

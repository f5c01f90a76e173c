#!/usr/bin/env bash
# Sourced by every torchrun recipe in scripts/: one place that turns the cluster's environment into
# torchrun's rendezvous flags, so all recipes take the same variables.
#
#   MASTER_ADDR, MASTER_PORT   rendezvous host and port (default 127.0.0.1:29500)
#   NNODES (or WORLD_SIZE)     number of nodes (the original DiT/SiT/USP scripts call it WORLD_SIZE)
#   NODE_RANK (or RANK)        this node's index, 0..NNODES-1
#   GPUS                       processes (GPUs) per node, default 8
#
# Usage inside a recipe:  source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"; launch -m pretrain.main_pretrain ...
# No cd: relative paths in the user's command (DATA_PATH, --resume, --output_dir) keep meaning what they
# typed; PYTHONPATH makes `-m pretrain.main_pretrain` etc. importable from any folder.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:-${WORLD_SIZE:-1}}
NODE_RANK=${NODE_RANK:-${RANK:-0}}
GPUS=${GPUS:-8}

# Prints the full setting (every flag, one per line, copy-pasteable) before it runs, so a log says
# exactly which recipe produced it; appended arguments come last and win over the recipe's.
print_setting() {
  local line="" arg
  printf '[recipe] node %s of %s, %s process(es) per node; full command:\n' "$NODE_RANK" "$NNODES" "$GPUS" >&2
  printf '  torchrun --nnodes=%s --node_rank=%s --nproc_per_node=%s --master_addr=%s --master_port=%s' \
    "$NNODES" "$NODE_RANK" "$GPUS" "$MASTER_ADDR" "$MASTER_PORT" >&2
  for arg in "$@"; do
    if [[ "$arg" == -* && -n "$line" ]]; then printf ' \\\n   %s' "$line" >&2; line=""; fi
    line+="${line:+ }$(printf '%q' "$arg")"
  done
  [ -n "$line" ] && printf ' \\\n   %s' "$line" >&2
  printf '\n' >&2
}

# torchrun reports a failed worker with ~40 lines of its own (a log line, its traceback, the ChildFailedError box)
# after the worker's one sentence, and exits 1 whatever the worker's code was. Its stderr goes through this filter:
# torchrun's elastic log lines are held back and dropped when a failure report follows, so the worker's sentence is
# the last line shown, and the first failed worker's exit code (from "failed (exitcode: N)", 128 + S for signal S)
# is written to $1. Lines of a run that does not fail pass through unchanged. Used when stderr is a log file.
quiet_torchrun_failure() {
  awk -v code_file="$1" '
    hiding { next }
    /^[EWI][0-9][0-9][0-9][0-9] / && /torch\/distributed\/elastic\// {
      if (match($0, /\] failed \(exitcode: -?[0-9]+/)) {
        code = substr($0, RSTART + 20, RLENGTH - 20) + 0; hiding = 1; held = ""; next
      }
      held = held $0 "\n"; next
    }
    { printf "%s%s\n", held, $0; held = ""; fflush() }
    END {
      printf "%s", held
      if (hiding) print (code < 0 ? 128 - code : code) > code_file
    }'
}

# SLURM (scancel, time limit, preemption) sends SIGTERM to every process of the step at once. The workers
# (util/preemption.py) finish their step, save and exit 0; for the task to exit 0 too, neither this shell nor
# torchrun may die of the signal (with --kill-on-bad-exit a task exiting 143 gets the workers SIGKILLed before
# they save), and torchrun may not handle it (it would exit 1 with a traceback even when every worker exited 0).
# So torchrun (and the stderr filter) run with SIGTERM ignored, torchrun unhandled, and the launch exits with the
# workers' status; this shell waits for it and hands a SIGTERM sent to it alone (a user's kill, Kubernetes) on to
# the workers. Ctrl-C works as before. torchrun before torch 2.9 has no --signals-to-handle: it then handles
# SIGTERM itself, its workers still save, but it exits 1 (one line says so before the launch).
launch() {
  local torchrun_pid filter_pid stderr_to status pipe_dir signals=(--signals-to-handle=SIGINT,SIGHUP,SIGQUIT)
  print_setting "$@"
  if ! torchrun --help 2> /dev/null | grep -q -- --signals-to-handle; then
    signals=()
    echo "[recipe] this torchrun has no --signals-to-handle (torch < 2.9): on SIGTERM the workers still save, but" \
      "torchrun exits 1 instead of 0; use torch >= 2.9 for a clean exit status." >&2
  fi
  pipe_dir=$(mktemp -d)
  stderr_to=/dev/stderr filter_pid=""
  if [ ! -t 2 ]; then  # a log file (SLURM, nohup); in a terminal torchrun's report stays, and so do tqdm bars
    mkfifo "$pipe_dir/stderr"
    ( trap '' TERM; quiet_torchrun_failure "$pipe_dir/code" < "$pipe_dir/stderr" >&2 ) &
    filter_pid=$! stderr_to="$pipe_dir/stderr"
  fi
  trap 'pkill -TERM -P "$torchrun_pid" || true' TERM
  ( trap '' TERM
    exec torchrun ${signals[@]+"${signals[@]}"} --nnodes="$NNODES" --node_rank="$NODE_RANK" \
      --nproc_per_node="$GPUS" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$@" 2> "$stderr_to" ) &
  torchrun_pid=$!
  while kill -0 "$torchrun_pid" 2> /dev/null; do wait "$torchrun_pid" || true; done  # a trap interrupts wait
  status=0
  wait "$torchrun_pid" || status=$?  # its exit status, which bash kept when it reaped it (the recipes use set -e)
  while [ -n "$filter_pid" ] && kill -0 "$filter_pid" 2> /dev/null; do wait "$filter_pid" || true; done
  [ -s "$pipe_dir/code" ] && status=$(< "$pipe_dir/code")
  rm -rf "$pipe_dir"
  return "$status"
}

# Sourced by the launchers (run_train.sh, multinode_train.sh, slurm_train.sbatch): a preempted run
# that saved exits 0, a failed one with its own code.
#
# SIGTERM or SIGINT reaches a job three ways: the launcher alone (`kill PID`, `sbatch
# --signal=B:TERM`), its process group (Ctrl-C, `kill -TERM -PGID`), or every process of the job
# (Slurm's preemption and time limit signal the whole step). train.py's workers stop cleanly on
# either: they finish the step, save and exit 0. torchrun must not act on them: its handler raises
# SignalException, passes the signal on, waits for the workers and then exits 1 with a traceback,
# although they saved, and requeue logic reads that code. So torchrun runs with both signals
# ignored, and the launcher passes each one it receives to the workers: torchrun's children, which
# run in sessions of their own that a process-group signal never reaches.

# reexec_with_stop_signals SCRIPT ARGS...: re-executes `bash SCRIPT ARGS` with SIGTERM and SIGINT at
# their defaults if this shell started with either ignored; returns otherwise. A signal ignored on
# entry cannot be trapped, and a non-interactive shell starts its background jobs with SIGINT
# ignored (`scripts/run_train.sh &` in a script): such a launcher would never see the SIGINT it
# promises to act on. Called before the launcher does anything else.
reexec_with_stop_signals() {
    local ignored
    ignored=$(awk '/^SigIgn:/ {print $2}' /proc/$$/status 2>/dev/null) || return 0
    (( 16#${ignored:-0} & ((1 << ($(kill -l INT) - 1)) | (1 << ($(kill -l TERM) - 1))) )) || return 0
    exec python3 -c 'import os, signal, sys
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, signal.SIG_DFL)
os.execvp("bash", ["bash", *sys.argv[1:]])' "$@"
}

# torchrun_preemptible ARGS...: `torchrun ARGS` with SIGTERM/SIGINT passed to its workers, not to it;
# returns torchrun's exit code.
torchrun_preemptible() {
    local stop="" torchrun
    local -A delivered=()
    trap 'stop=${stop:-TERM}' TERM
    trap 'stop=${stop:-INT}' INT
    # An ignored signal stays ignored across exec; --signals-to-handle keeps torchrun from
    # installing its handlers over these two.
    (trap '' TERM INT; exec torchrun --signals-to-handle SIGHUP,SIGQUIT "$@") &
    torchrun=$!
    while kill -0 "$torchrun" 2>/dev/null; do
        if [[ -z $stop ]]; then
            wait "$torchrun" || true  # returns when torchrun exits or a signal's trap has run
        else
            pass_to_workers "$torchrun" "$stop"
            sleep 1  # workers still starting catch it once train.py's handlers are in
        fi
    done
    trap - TERM INT
    wait "$torchrun"  # bash keeps the exit code of a finished child
}

# pass_to_workers TORCHRUN_PID SIGNAL: SIGNAL to each worker that catches it and has not had it yet.
# A worker inherits the signal ignored; until train.py's main installs its handlers (imports take
# seconds) a signal would be lost, so a worker gets it once it catches it (SigCgt), exactly once:
# a second would be harmless to train.py but may interrupt a system call in a library's thread.
pass_to_workers() {
    local worker caught bit
    bit=$(( 1 << ($(kill -l "$2") - 1) ))
    for worker in $(pgrep -P "$1"); do
        [[ -z ${delivered[$worker]:-} ]] || continue
        caught=$(awk '/^SigCgt:/ {print $2}' "/proc/$worker/status" 2>/dev/null) || continue
        if (( 16#${caught:-0} & bit )) && kill "-$2" "$worker" 2>/dev/null; then
            delivered[$worker]=1
        fi
    done
}

# wait_passing_signals PID: wait for PID (a background srun), passing SIGTERM and SIGINT on to it as
# SIGTERM (srun forwards SIGTERM to its tasks; one SIGINT only makes it print their status); returns
# PID's exit code.
wait_passing_signals() {
    trap "kill -TERM $1 2>/dev/null || true" TERM INT
    while kill -0 "$1" 2>/dev/null; do
        wait "$1" || true
    done
    trap - TERM INT
    wait "$1"
}

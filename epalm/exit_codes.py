"""Process exit codes every entry point shares (training, feature extraction, the CLIs, the supervisor), and
the signals that stop a run with REQUEUE."""

import signal

OK = 0
FAILED = 1  # an error during the work (a traceback says what)
USAGE = 2  # bad input: a missing file, a bad override, a wrong task; one `error: ...` line says what
REQUEUE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; requeue and --resume auto

STOP_SIGNALS = (
    signal.SIGTERM,
    signal.SIGUSR1,
)  # SLURM's --signal=B:USR1@300, a scheduler's or container's TERM

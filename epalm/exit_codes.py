"""Process exit codes every entry point shares (training, feature extraction, the CLIs, the supervisor)."""

OK = 0
FAILED = 1  # an error during the work (a traceback says what)
USAGE = 2  # bad input: a missing file, a bad override, a wrong task; one `error: ...` line says what
REQUEUE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; requeue and --resume auto

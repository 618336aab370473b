// The stop signals of `tessera train`: SIGTERM and SIGUSR1 (what Slurm, Kubernetes and mpirun
// send before taking a job's nodes) set a process-wide flag and do nothing else; the step loop
// reads it at step boundaries (stop_rule.h's StopCheck) and ends the job with a checkpoint.
#pragma once

namespace tessera {

// Installs the handlers (sigaction, SA_RESTART, so interrupted system calls resume). A handler
// only stores the signal's number in a lock-free atomic: async-signal-safe. Further signals
// overwrite it and are otherwise ignored, so a second TERM while stopping changes nothing.
void install_stop_signal_handlers();

// The last stop signal this process received (SIGTERM or SIGUSR1), or 0 for none.
int stop_signal_received();

// Forgets a received signal (tests that raise one and then go on).
void clear_stop_signal();

}  // namespace tessera

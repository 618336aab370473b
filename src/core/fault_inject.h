// Fault injection for tests of failure handling: TESSERA_FAULT_INJECT="rank=R,op=NAME,step=S"
// makes global rank R fail with a system error (or, at a signal point, send itself SIGTERM) when
// it reaches the named point at step S; an optional ",group=G" narrows a communicator point to
// one group (parallel/flight_recorder.h: op=comm_sleep or comm_skip with step = the group's
// sequence number). Unset (the normal case) it costs one cached environment lookup per call.
#pragma once
#include <cstdint>
#include <string_view>

namespace tessera {

// True when the injection spec names this (rank, op, step) and, when the spec names a group,
// that group. The caller decides what failing means (an error, a NaN gradient, a sleep, ...).
// Malformed specs are a user error naming the variable.
bool fault_requested(int rank, std::string_view op, int64_t step, std::string_view group = {});

// Throws a system error "[rank R] injected fault at OP step S" when requested.
void fault_point(int rank, std::string_view op, int64_t step);

// Sends this process SIGTERM when requested: a preemption arriving in a given phase (the
// trainer's points: term_in_warmup at step 0, term_in_eval, term_in_save).
void signal_point(int rank, std::string_view op, int64_t step);

}  // namespace tessera

// Fault injection for tests of failure handling: TESSERA_FAULT_INJECT="rank=R,op=NAME,step=S"
// makes global rank R fail with a system error (or, at a signal point, send itself SIGTERM) when
// it reaches the named point at step S. Unset (the normal case) it costs one cached environment
// lookup per call.
#pragma once
#include <cstdint>
#include <string_view>

namespace tessera {

// True when the injection spec names this (rank, op, step). The caller decides what failing means
// (an error, a NaN gradient, ...). Malformed specs are a user error naming the variable.
bool fault_requested(int rank, std::string_view op, int64_t step);

// Throws a system error "[rank R] injected fault at OP step S" when requested.
void fault_point(int rank, std::string_view op, int64_t step);

// Sends this process SIGTERM when requested: a preemption arriving in a given phase (the
// trainer's points: term_in_warmup at step 0, term_in_eval, term_in_save).
void signal_point(int rank, std::string_view op, int64_t step);

}  // namespace tessera

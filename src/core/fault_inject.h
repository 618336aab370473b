// Fault injection for tests of failure handling: TESSERA_FAULT_INJECT="rank=R,op=NAME,step=S"
// makes global rank R fail with a system error when it reaches the named point at step S. Unset
// (the normal case) it costs one cached environment lookup per call.
#pragma once
#include <cstdint>
#include <string_view>

namespace tessera {

// True when the injection spec names this (rank, op, step). The caller decides what failing means
// (an error, a NaN gradient, ...). Malformed specs are a user error naming the variable.
bool fault_requested(int rank, std::string_view op, int64_t step);

// Throws a system error "[rank R] injected fault at OP step S" when requested.
void fault_point(int rank, std::string_view op, int64_t step);

}  // namespace tessera

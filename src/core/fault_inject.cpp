// Parses TESSERA_FAULT_INJECT once and answers whether a (rank, op, step) point should fail.
#include "core/fault_inject.h"

#include <csignal>
#include <cstdlib>
#include <optional>
#include <string>

#include "core/error.h"

namespace tessera {

namespace {

struct FaultSpec {
  int rank = -1;
  std::string op;
  int64_t step = -1;
  std::string group;  // empty: any group
};

std::optional<FaultSpec> parse_spec() {
  const char* env = std::getenv("TESSERA_FAULT_INJECT");
  if (!env || !*env) return std::nullopt;
  FaultSpec s;
  std::string_view rest(env);
  while (!rest.empty()) {
    const size_t comma = rest.find(',');
    const std::string_view item = rest.substr(0, comma);
    rest = comma == std::string_view::npos ? std::string_view() : rest.substr(comma + 1);
    const size_t eq = item.find('=');
    if (eq == std::string_view::npos)
      TS_USER_ERROR(
          "TESSERA_FAULT_INJECT='{}': '{}' is not key=value (keys: rank, op, step, group)", env,
          item);
    const std::string key(item.substr(0, eq)), value(item.substr(eq + 1));
    try {
      if (key == "rank")
        s.rank = std::stoi(value);
      else if (key == "step")
        s.step = std::stoll(value);
      else if (key == "op")
        s.op = value;
      else if (key == "group")
        s.group = value;
      else
        TS_USER_ERROR("TESSERA_FAULT_INJECT='{}': unknown key '{}' (keys: rank, op, step, group)",
                      env, key);
    } catch (const std::logic_error&) {
      TS_USER_ERROR("TESSERA_FAULT_INJECT='{}': '{}' is not a number for '{}'", env, value, key);
    }
  }
  if (s.rank < 0 || s.op.empty() || s.step < 0)
    TS_USER_ERROR("TESSERA_FAULT_INJECT='{}' needs rank=R,op=NAME,step=S", env);
  return s;
}

}  // namespace

bool fault_requested(int rank, std::string_view op, int64_t step, std::string_view group) {
  static const std::optional<FaultSpec> spec = parse_spec();
  return spec && spec->rank == rank && spec->op == op && spec->step == step &&
         (spec->group.empty() || spec->group == group);
}

void fault_point(int rank, std::string_view op, int64_t step) {
  if (fault_requested(rank, op, step))
    TS_SYSTEM_ERROR("injected fault at {} step {} (TESSERA_FAULT_INJECT)", op, step);
}

void signal_point(int rank, std::string_view op, int64_t step) {
  if (fault_requested(rank, op, step)) std::raise(SIGTERM);
}

}  // namespace tessera

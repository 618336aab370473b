// The every-op test (ggml's test-backend-ops in spirit): every op declared in kernels/ops.h,
// kernels/ops_fp8.h, kernels/ops_moe.h and kernels/ops_infer.h must have (a) a CPU reference, a
// function of its name defined in namespace tessera::cpu in kernels/cpu/*.cpp; (b) a CUDA kernel,
// defined in namespace tessera::cuda in kernels/cuda/*.cu; (c) a finite-difference case and (d) a
// GPU parity case, registered by the cases of this executable (TS_FD_TEST, TS_GPU_PARITY_TEST*,
// tests/common/op_cases.h). The inference ops (ops_infer.h) are forward-only: exempt from (c),
// they must have (e) a CPU value case (TS_CPU_VALUE_TEST) instead. The op list is parsed from the
// headers at test time (TESSERA_SOURCE_DIR), so adding a declaration without the rest fails CI,
// CPU-only builds included. Exemptions are explicit, commented, and checked for staleness (each
// names a declared op that indeed lacks what it is exempted from).
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "tests/common/files.h"
#include "tests/common/op_cases.h"

namespace tessera::testing {
namespace {

// ---- a small C++ scanner --------------------------------------------------------------------
// Enough of C++ to find the functions declared or defined at namespace scope of our own sources:
// comments, string and character literals are blanked out, braces are tracked, and a statement at
// namespace scope with a parenthesis names a function (the identifier before its first '(').

// Source with comments, string and character literals replaced by spaces (newlines kept).
std::string strip_comments_and_literals(const std::string& s) {
  std::string out(s.size(), ' ');
  size_t i = 0;
  const auto is_digit = [](char c) { return c >= '0' && c <= '9'; };
  while (i < s.size()) {
    const char c = s[i];
    if (c == '/' && i + 1 < s.size() && s[i + 1] == '/') {
      while (i < s.size() && s[i] != '\n') ++i;
    } else if (c == '/' && i + 1 < s.size() && s[i + 1] == '*') {
      const size_t end = s.find("*/", i + 2);
      for (size_t j = i; j < std::min(s.size(), end + 2); ++j)
        if (s[j] == '\n') out[j] = '\n';
      i = end == std::string::npos ? s.size() : end + 2;
    } else if (c == 'R' && i + 1 < s.size() && s[i + 1] == '"') {  // raw string R"d( ... )d"
      const size_t open = s.find('(', i);
      if (open == std::string::npos) break;
      std::string close = ")";  // appended piecewise: GCC 12 misreports operator+ (-Wrestrict)
      close.append(s, i + 2, open - i - 2);
      close += '"';
      const size_t end = s.find(close, open);
      i = end == std::string::npos ? s.size() : end + close.size();
    } else if (c == '"' || (c == '\'' && !(i > 0 && is_digit(s[i - 1])))) {  // not 1'000
      ++i;
      while (i < s.size() && s[i] != c) i += s[i] == '\\' ? 2 : 1;
      ++i;
    } else {
      out[i] = c;
      ++i;
    }
  }
  return out;
}

bool is_ident_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

// The function a namespace-scope statement declares or defines, or "" when it declares none
// (types, variables, using-declarations, macros without parentheses).
std::string function_name(const std::string& stmt) {
  static const std::set<std::string> kNotNames = {
      "decltype",   "alignas",  "__launch_bounds__", "__attribute__",
      "__declspec", "noexcept", "requires",          "operator"};
  std::string s = stmt;
  // Leading template heads are not part of the name.
  size_t start = s.find_first_not_of(" \t\n");
  if (start == std::string::npos) return "";
  s = s.substr(start);
  for (const char* kw : {"namespace", "struct", "class", "enum", "union", "using", "typedef",
                         "static_assert", "extern \"", "#"})
    if (s.rfind(kw, 0) == 0) return "";
  const size_t eq = s.find('=');
  for (size_t p = s.find('('); p != std::string::npos; p = s.find('(', p + 1)) {
    if (eq != std::string::npos && eq < p) return "";  // a variable initialized by a call
    size_t e = p;
    while (e > 0 && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
    size_t b = e;
    while (b > 0 && is_ident_char(s[b - 1])) --b;
    const std::string name = s.substr(b, e - b);
    if (name.empty() || kNotNames.count(name)) continue;
    if (s.rfind("template", 0) == 0 && s.find('>') > p) continue;
    return name;
  }
  return "";
}

// Functions declared or defined at namespace scope, by enclosing namespace ("tessera::ops",
// "tessera::cpu", "" for the global one, "(anonymous)" segments for unnamed namespaces).
std::map<std::string, std::set<std::string>> namespace_functions(const std::string& source) {
  const std::string s = strip_comments_and_literals(source);
  std::map<std::string, std::set<std::string>> found;
  struct Block {
    bool is_namespace;
    std::string name;  // the namespace's own name(s), "a::b" for `namespace a::b`
  };
  std::vector<Block> stack;
  const auto at_namespace_scope = [&] {
    for (const Block& b : stack)
      if (!b.is_namespace) return false;
    return true;
  };
  const auto current = [&] {
    std::string q;
    for (const Block& b : stack) q += (q.empty() ? "" : "::") + b.name;
    return q;
  };
  std::string stmt;
  for (size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    if (c == '#' && (i == 0 || s[i - 1] == '\n')) {  // preprocessor line (with continuations)
      while (i < s.size() && !(s[i] == '\n' && s[i - 1] != '\\')) ++i;
      continue;
    }
    if (!at_namespace_scope()) {
      if (c == '{') stack.push_back({false, ""});
      if (c == '}') stack.pop_back();
      continue;
    }
    if (c == '{') {
      const size_t first = stmt.find_first_not_of(" \t\n");
      const std::string head = first == std::string::npos ? "" : stmt.substr(first);
      if (head.rfind("namespace", 0) == 0) {
        std::string name = head.substr(9);
        name.erase(0, name.find_first_not_of(" \t\n"));
        name.erase(name.find_last_not_of(" \t\n") + 1);
        stack.push_back({true, name.empty() ? "(anonymous)" : name});
      } else {
        const std::string fn = function_name(stmt);
        if (!fn.empty()) found[current()].insert(fn);  // a definition
        stack.push_back({false, ""});
      }
      stmt.clear();
    } else if (c == '}') {
      if (!stack.empty()) stack.pop_back();
      stmt.clear();
    } else if (c == ';') {
      const std::string fn = function_name(stmt);
      if (!fn.empty()) found[current()].insert(fn);  // a declaration
      stmt.clear();
    } else {
      stmt += c;
    }
  }
  return found;
}

// Functions of namespace `ns` in every file of `dir` ending in `ext`.
std::set<std::string> functions_in(const std::string& dir, const std::string& ext,
                                   const std::string& ns) {
  std::set<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(source_path(dir))) {
    if (entry.path().extension() != ext) continue;
    const auto found = namespace_functions(read_all(entry.path().string()));
    if (auto it = found.find(ns); it != found.end())
      names.insert(it->second.begin(), it->second.end());
  }
  return names;
}

// ---- the op list and its exemptions ---------------------------------------------------------

// Functions of namespace tessera::ops declared in `headers`.
std::set<std::string> ops_of(std::initializer_list<const char*> headers) {
  std::set<std::string> ops;
  for (const char* header : headers) {
    const auto found = namespace_functions(read_all(source_path(header)));
    if (auto it = found.find("tessera::ops"); it != found.end())
      ops.insert(it->second.begin(), it->second.end());
  }
  return ops;
}

// Every function of the op contract: namespace tessera::ops of kernels/ops.h, ops_fp8.h,
// ops_moe.h and ops_infer.h.
std::set<std::string> declared_ops() {
  return ops_of({"kernels/ops.h", "kernels/ops_fp8.h", "kernels/ops_moe.h", "kernels/ops_infer.h"});
}

// The inference engine's ops (forward-only, no backward to difference against).
std::set<std::string> inference_ops() { return ops_of({"kernels/ops_infer.h"}); }

// Backend services and pure host logic declared beside the ops: no kernel, nothing to
// differentiate or compare, so none of (a) to (d) applies.
const std::map<std::string, std::string> kNotKernels = {
    {"synchronize", "waits for a stream; no data"},
    {"cuda_workspace_bytes", "sizes scratch memory on the host"},
    {"use_cuda_workspace", "hands the backend its scratch memory"},
    {"fp8_max_of", "a constant per fp8 format, computed on the host"},
    {"paged_attention_scratch_bytes", "sizes paged attention's scratch on the host"},
};

// (a) Ops without a function in kernels/cpu: the fused sequences, which the CPU runs as their
// defining sequence of contract ops (kernels/ops.cpp), rounding between steps as storage would.
const std::map<std::string, std::string> kNoCpuFunction = {
    {"add_layernorm_forward", "CPU runs add_forward then layernorm_forward"},
    {"adamw_update_multi", "CPU runs adamw_update on each entry"},
};

// (c) Ops without a finite-difference case: they have no backward and are no backward (what
// training differentiates through them is checked elsewhere, as noted), or their output is not a
// differentiable function at all.
const std::map<std::string, std::string> kNoFiniteDifferences = {
    {"gemm", "no backward op: its gradients are gemms, checked in matmul_backward's FD case"},
    {"add_forward", "no backward op: the gradient of a sum is the incoming gradient itself"},
    {"add_inplace", "the residual branch's gradient sum; exact arithmetic is tested"},
    {"scale_inplace", "no backward op (loss scaling, gradient clipping)"},
    {"fill", "no inputs"},
    {"cast", "no backward op; rounding is tested bit for bit"},
    {"sum_squares", "no backward op (the gradient norm)"},
    {"adamw_update", "an optimizer update, not differentiated"},
    {"adamw_update_multi", "an optimizer update, not differentiated"},
    {"add_layernorm_forward",
     "equal bit for bit to add_forward + layernorm_forward, whose gradients are checked"},
    {"fp8_quantize", "quantization: piecewise constant, no useful derivative"},
    {"fake_quantize",
     "quantization: piecewise constant; QAT's straight-through gradient is the identity (no op), "
     "its contract and the QAT linear's gradients are tested in tests/optim/qat_linear_test.cpp"},
    {"row_absmax", "a scale statistic for fake_quantize, not differentiated"},
    {"swiglu_backward_fp8",
     "equal bit for bit to swiglu_backward (FD-checked) followed by fp8_quantize"},
    {"gemm_fp8", "no backward op: FP8 gradients are gemm_fp8 calls; fp8 operands are quantized"},
    {"fp8_update_scales", "a scaling-state update, not differentiated"},
    {"topk_logits",
     "a selection (the ids are piecewise constant) and log-sum-exps of the teacher, which is not "
     "differentiated; checked against a full sort in topk_logits_test.cpp"},
    {"moe_dispatch_plan",
     "an index computation (integer routing plan): nothing to differentiate; its hand-computed "
     "and brute-force cases are in moe_permute_test.cpp"},
    // The inference ops: forward-only (the engine never differentiates); each has CPU value cases
    // against an independent computation instead (HasACpuValueCase below).
    {"infer_linear_forward", "forward-only inference op; CPU value cases in infer_linear_test"},
    {"kv_cache_write", "a copy into cache slots, forward-only; CPU value cases in kv_cache_test"},
    {"kv_cache_copy_blocks", "a block copy, forward-only; CPU value cases in kv_cache_test"},
    {"paged_attention_forward",
     "forward-only inference op; CPU value cases (dense causal attention over the gathered "
     "cache) in paged_attention_test"},
    {"rope_rows_forward",
     "forward-only inference op (rope_forward's gradient is FD-checked); CPU value cases in "
     "rope_test"},
};

// (d) Ops without a GPU parity case: none.
const std::map<std::string, std::string> kNoGpuParity = {};

std::set<std::string> registered(OpCaseKind kind) {
  std::set<std::string> ops;
  for (const OpCase& c : op_case_registry())
    if (c.kind == kind) ops.insert(c.op);
  return ops;
}

void expect_exemptions_current(const std::map<std::string, std::string>& exempt,
                               const std::set<std::string>& ops, const std::set<std::string>& has,
                               const std::string& what) {
  for (const auto& [op, why] : exempt) {
    EXPECT_TRUE(ops.count(op))
        << "stale exemption from " << what << ": " << op
        << " is not declared in kernels/ops.h, ops_fp8.h, ops_moe.h or ops_infer.h";
    EXPECT_FALSE(has.count(op)) << "stale exemption from " << what << ": " << op << " has one now ("
                                << why << "); remove the exemption";
  }
}

// Every op of `ops` must be in `has`, unless exempt.
void expect_every_op_has(const std::set<std::string>& ops, const std::set<std::string>& has,
                         const std::map<std::string, std::string>& exempt,
                         const std::string& what) {
  for (const std::string& op : ops) {
    if (!kNotKernels.count(op) && !exempt.count(op)) {
      EXPECT_TRUE(has.count(op)) << "op " << op << " has no " << what;
    }
  }
  expect_exemptions_current(exempt, ops, has, what);
}

// ---- the cases ------------------------------------------------------------------------------

TEST(EveryOp, ScannerFindsOnlyNamespaceScopeFunctions) {
  const std::string src = R"(
namespace tessera::ops {
// void commented(Tensor x);
struct S { void member(int); int x = f(1); };
enum class E { a, b };
constexpr int kValue = compute(3);
void declared(Tensor x /*(B,T)*/, int n = g(2));
template <class T>
T templated(T x) { auto lambda = [](int) { return "};"; }; return x; }
inline double defined(char c = '{') { return 0; }
}  // namespace tessera::ops
namespace tessera::cpu { namespace { void helper(); } void kernel(int); }
)";
  const auto found = namespace_functions(src);
  EXPECT_EQ(found.at("tessera::ops"), (std::set<std::string>{"declared", "templated", "defined"}));
  EXPECT_EQ(found.at("tessera::cpu"), (std::set<std::string>{"kernel"}));
  EXPECT_EQ(found.at("tessera::cpu::(anonymous)"), (std::set<std::string>{"helper"}));
}

TEST(EveryOp, HeadersDeclareTheOps) {
  const std::set<std::string> ops = declared_ops();
  // A sanity floor, so a scanner that finds nothing cannot pass the cases below vacuously.
  for (const char* op :
       {"embedding_forward", "gemm", "attention_backward", "cross_entropy_shard_finish",
        "adamw_update_multi", "fp8_quantize", "fp8_update_scales"})
    EXPECT_TRUE(ops.count(op)) << op;
  EXPECT_GE(ops.size(), 40u);
  for (const auto& [op, why] : kNotKernels) EXPECT_TRUE(ops.count(op)) << "stale: " << op;
}

TEST(EveryOp, HasACpuReference) {
  expect_every_op_has(declared_ops(), functions_in("kernels/cpu", ".cpp", "tessera::cpu"),
                      kNoCpuFunction,
                      "CPU reference in kernels/cpu/*.cpp (namespace tessera::cpu)");
}

TEST(EveryOp, HasACudaKernel) {
  expect_every_op_has(declared_ops(), functions_in("kernels/cuda", ".cu", "tessera::cuda"), {},
                      "CUDA kernel in kernels/cuda/*.cu (namespace tessera::cuda)");
}

TEST(EveryOp, HasAFiniteDifferenceCase) {
  expect_every_op_has(declared_ops(), registered(OpCaseKind::finite_difference),
                      kNoFiniteDifferences, "finite-difference case (TS_FD_TEST)");
}

TEST(EveryOp, HasAGpuParityCase) {
  expect_every_op_has(declared_ops(), registered(OpCaseKind::gpu_parity), kNoGpuParity,
                      "GPU parity case (TS_GPU_PARITY_TEST)");
}

TEST(EveryOp, InferenceOpsHaveACpuValueCase) {
  const std::set<std::string> ops = inference_ops();
  EXPECT_TRUE(ops.count("infer_linear_forward") && ops.count("paged_attention_forward"));
  const std::set<std::string> has = registered(OpCaseKind::cpu_value);
  for (const std::string& op : ops)
    if (!kNotKernels.count(op)) {
      EXPECT_TRUE(has.count(op)) << "inference op " << op << " has no CPU value case "
                                 << "(TS_CPU_VALUE_TEST)";
      EXPECT_TRUE(kNoFiniteDifferences.count(op))
          << "inference op " << op << " is forward-only: exempt it from finite differences";
    }
}

TEST(EveryOp, RegisteredCasesNameDeclaredOps) {
  const std::set<std::string> ops = declared_ops();
  for (const OpCase& c : op_case_registry())
    EXPECT_TRUE(ops.count(c.op)) << c.test << " registers unknown op " << c.op;
}

}  // namespace
}  // namespace tessera::testing

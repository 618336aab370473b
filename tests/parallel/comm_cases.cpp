// Communicator test cases (see comm_cases.h): input generation, guarded staging buffers, the
// per-element reduction reference with its error bound, and the collective/P2P/group checks.
#include "tests/parallel/comm_cases.h"

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "core/dtype.h"

namespace tessera::testing {

namespace {

uint64_t mix(uint64_t x) {  // splitmix64's finalizer: a bijection with good avalanche
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t draw(uint64_t seed, int rank, int64_t i) {
  return mix(mix(seed) ^ mix(static_cast<uint64_t>(rank) + 0x1234) ^
             (static_cast<uint64_t>(i) * 0xD1B54A32D192ED03ull));
}

void store(DType t, Bytes& b, int64_t i, double v) {
  uint8_t* p = b.data() + i * dtype_size(t);
  switch (t) {
    case DType::f32: {
      const float x = static_cast<float>(v);
      std::memcpy(p, &x, 4);
      return;
    }
    case DType::f64: std::memcpy(p, &v, 8); return;
    case DType::bf16: {
      const uint16_t x = f32_to_bf16_bits(static_cast<float>(v));
      std::memcpy(p, &x, 2);
      return;
    }
    case DType::f16: {
      const uint16_t x = f32_to_f16_bits(static_cast<float>(v));
      std::memcpy(p, &x, 2);
      return;
    }
    case DType::i32: {
      const int32_t x = static_cast<int32_t>(v);
      std::memcpy(p, &x, 4);
      return;
    }
    default: break;
  }
  ADD_FAILURE() << "store: unexpected dtype " << dtype_name(t);
}

// Unit roundoff of the dtype's arithmetic: half the distance from 1 to the next value.
double unit_roundoff(DType t) {
  switch (t) {
    case DType::f64: return std::ldexp(1.0, -53);
    case DType::f32: return std::ldexp(1.0, -24);
    case DType::bf16: return std::ldexp(1.0, -8);
    case DType::f16: return std::ldexp(1.0, -11);
    default: return 0;
  }
}

// a + b computed once in the dtype, as any implementation must for a two-rank sum: f32/f64
// natively; bf16/f16 in f32 (exact for two 16-bit values of similar exponent) then rounded to
// nearest even.
double add_in_dtype(DType t, double a, double b) {
  switch (t) {
    case DType::f64: return a + b;
    case DType::f32: return static_cast<float>(a) + static_cast<float>(b);
    case DType::bf16: return round_bf16(static_cast<float>(a) + static_cast<float>(b));
    case DType::f16: return round_f16(static_cast<float>(a) + static_cast<float>(b));
    default: return a + b;  // i32: exact in double for these magnitudes
  }
}

struct Expected {
  double value;
  double tol;  // 0: exact
};

// The reduction of element idx over every rank's input, in rank order.
// Sums: each of the size - 1 pairwise additions (in whatever order or tree the library uses)
// rounds once, with an error of at most u * |partial sum| <= u * sum|x|, so
// |computed - exact| <= (size - 1) * u * sum|x| (Higham, Accuracy and Stability, 4.2), plus half
// a subnormal step per addition where a partial sum can be subnormal (f16's 2^-25; negligible for
// the wider types). Two ranks add once, so their result is exact: round(a + b). Integer sums and
// maxima are exact.
Expected reference(DType t, ReduceOp op, const std::vector<Bytes>& inputs, int64_t idx) {
  const int size = static_cast<int>(inputs.size());
  if (op == ReduceOp::max) {
    double m = load(t, inputs[0], idx);
    for (int q = 1; q < size; ++q) m = std::max(m, load(t, inputs[q], idx));
    return {m, 0};
  }
  if (size == 2 && t != DType::i32) {
    return {add_in_dtype(t, load(t, inputs[0], idx), load(t, inputs[1], idx)), 0};
  }
  double sum = 0;
  double abs_sum = 0;
  for (int q = 0; q < size; ++q) {
    const double x = load(t, inputs[q], idx);
    sum += x;
    abs_sum += std::fabs(x);
  }
  if (t == DType::i32) return {sum, 0};
  const double subnormal_half = t == DType::f16 ? std::ldexp(1.0, -25) : 0.0;
  // 1.01: room for the O(u^2) terms the first-order bound leaves out.
  const double tol = (size - 1) * (1.01 * unit_roundoff(t) * abs_sum + subnormal_half);
  return {sum, tol};
}

// Reports at most a few element mismatches per check, then the count.
class MismatchCounter {
 public:
  void add(const std::string& what) {
    if (++count_ <= 5) ADD_FAILURE() << what;
  }
  ~MismatchCounter() { EXPECT_EQ(count_, 0) << "mismatching elements"; }

 private:
  int count_ = 0;
};

void expect_bytes_equal(const Bytes& got, const Bytes& want, size_t elem, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  MismatchCounter bad;
  for (size_t i = 0; i < got.size(); i += elem) {
    if (std::memcmp(got.data() + i, want.data() + i, elem) != 0) {
      bad.add(fmt::format("{}: element {} differs", what, i / elem));
    }
  }
}

void expect_reduced(DType t, ReduceOp op, const std::vector<Bytes>& inputs, int64_t offset,
                    const Bytes& got, int64_t n) {
  MismatchCounter bad;
  for (int64_t j = 0; j < n; ++j) {
    const Expected e = reference(t, op, inputs, offset + j);
    const double v = load(t, got, j);
    if (!(std::fabs(v - e.value) <= e.tol)) {
      bad.add(fmt::format("element {}: got {:.17g}, expected {:.17g} (tolerance {:.3g})", j, v,
                          e.value, e.tol));
    }
  }
}

Bytes concat(const std::vector<Bytes>& parts) {
  Bytes all;
  for (const Bytes& p : parts) all.insert(all.end(), p.begin(), p.end());
  return all;
}

Bytes chunk(const Bytes& b, int64_t idx, int64_t n, DType t) {
  const size_t bytes = dtype_storage_bytes(t, n);
  return Bytes(b.begin() + idx * bytes, b.begin() + (idx + 1) * bytes);
}

std::string describe(const Communicator& c, const char* op, DType t, int64_t n) {
  return fmt::format("{} {} n={} on group '{}' (rank {} of {}, {})", op, dtype_name(t), n, c.name(),
                     c.rank(), c.size(), device_name(c.device()));
}

// The members of rank's group g, derived by filtering all ranks on their coordinates (not with
// the arithmetic of topology.cpp or parallel_context.cpp), in the documented group-rank order.
std::vector<int> expected_members(const Topology& topo, Group g, int rank) {
  const RankCoord me = topo.coord(rank);
  const int tp = topo.size(Axis::tp);
  const int pp = topo.size(Axis::pp);
  const int ep = topo.ep_size();
  std::vector<std::pair<int, int>> keyed;  // (order key, rank)
  for (int q = 0; q < topo.world_size(); ++q) {
    const RankCoord c = topo.coord(q);
    switch (g) {
      case Group::world: keyed.push_back({q, q}); break;
      case Group::tp:
        if (c.dp_rank == me.dp_rank && c.pp_rank == me.pp_rank) keyed.push_back({c.tp_rank, q});
        break;
      case Group::dp:
        if (c.tp_rank == me.tp_rank && c.pp_rank == me.pp_rank) keyed.push_back({c.dp_rank, q});
        break;
      case Group::pp:
      case Group::embedding:
        if (c.tp_rank == me.tp_rank && c.dp_rank == me.dp_rank) keyed.push_back({c.pp_rank, q});
        break;
      case Group::model:
        if (c.dp_rank == me.dp_rank) keyed.push_back({c.tp_rank + tp * c.pp_rank, q});
        break;
      case Group::ep:  // the same block of ep dp coordinates
        if (c.tp_rank == me.tp_rank && c.pp_rank == me.pp_rank && c.dp_rank / ep == me.dp_rank / ep)
          keyed.push_back({c.dp_rank, q});
        break;
      case Group::expert_dp:  // the same position within such a block
        if (c.tp_rank == me.tp_rank && c.pp_rank == me.pp_rank && c.dp_rank % ep == me.dp_rank % ep)
          keyed.push_back({c.dp_rank, q});
        break;
    }
  }
  std::sort(keyed.begin(), keyed.end());
  std::vector<int> members;
  for (const auto& [key, q] : keyed) members.push_back(q);
  if (g == Group::embedding) {
    const bool end_stage = me.pp_rank == 0 || me.pp_rank == pp - 1;
    if (pp == 1 || !end_stage) return {rank};
    return {members.front(), members.back()};
  }
  return members;
}

}  // namespace

Bytes make_values(DType t, uint64_t seed, int rank, int64_t n) {
  Bytes b(dtype_storage_bytes(t, n));
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t r = draw(seed, rank, i);
    if (t == DType::i32) {
      store(t, b, i, static_cast<double>(static_cast<int64_t>(r % 2001) - 1000));
    } else {
      store(t, b, i, static_cast<double>(r >> 11) * std::ldexp(1.0, -52) - 1.0);
    }
  }
  return b;
}

Bytes make_bits(DType t, uint64_t seed, int rank, int64_t n) {
  Bytes b(dtype_storage_bytes(t, n));
  for (size_t i = 0; i < b.size(); i += 8) {
    const uint64_t r = draw(seed ^ 0xB175, rank, static_cast<int64_t>(i / 8));
    std::memcpy(b.data() + i, &r, std::min<size_t>(8, b.size() - i));
  }
  return b;
}

double load(DType t, const Bytes& b, int64_t i) {
  const uint8_t* p = b.data() + i * dtype_size(t);
  switch (t) {
    case DType::f32: {
      float x;
      std::memcpy(&x, p, 4);
      return x;
    }
    case DType::f64: {
      double x;
      std::memcpy(&x, p, 8);
      return x;
    }
    case DType::bf16: {
      uint16_t x;
      std::memcpy(&x, p, 2);
      return bf16_bits_to_f32(x);
    }
    case DType::f16: {
      uint16_t x;
      std::memcpy(&x, p, 2);
      return f16_bits_to_f32(x);
    }
    case DType::i32: {
      int32_t x;
      std::memcpy(&x, p, 4);
      return x;
    }
    default: break;
  }
  ADD_FAILURE() << "load: unexpected dtype " << dtype_name(t);
  return 0;
}

Staged::Staged(Device d, DType t, int64_t n)
    : device_(d),
      dtype_(t),
      n_(n),
      bytes_(dtype_storage_bytes(t, n)),
      buffer_(d, bytes_ + 2 * kGuard) {
  const Bytes fill(bytes_ + 2 * kGuard, kGuardByte);
  copy_bytes(buffer_.data(), device_, fill.data(), Device::cpu, fill.size());
}

Tensor Staged::tensor() const {
  return Tensor(static_cast<char*>(buffer_.data()) + kGuard, dtype_, device_, {n_});
}

void Staged::upload(const Bytes& host) {
  ASSERT_EQ(host.size(), bytes_);
  copy_bytes(static_cast<char*>(buffer_.data()) + kGuard, device_, host.data(), Device::cpu,
             bytes_);
}

Bytes Staged::download() const {
  Bytes host(bytes_);
  copy_bytes(host.data(), Device::cpu, static_cast<char*>(buffer_.data()) + kGuard, device_,
             bytes_);
  return host;
}

bool Staged::guards_intact() const {
  Bytes all(bytes_ + 2 * kGuard);
  copy_bytes(all.data(), Device::cpu, buffer_.data(), device_, all.size());
  for (size_t i = 0; i < kGuard; ++i) {
    if (all[i] != kGuardByte || all[kGuard + bytes_ + i] != kGuardByte) return false;
  }
  return true;
}

void check_all_reduce(Communicator& c, DType t, ReduceOp op, int64_t n, uint64_t seed) {
  SCOPED_TRACE(describe(c, reduce_op_name(op), t, n));
  std::vector<Bytes> inputs;
  for (int q = 0; q < c.size(); ++q) inputs.push_back(make_values(t, seed, q, n));
  Staged buf(c.device(), t, n);
  buf.upload(inputs[c.rank()]);
  CommHandle handle = c.all_reduce_async(buf.tensor(), op);
  handle->wait();
  handle->wait();  // idempotent
  const Bytes got = buf.download();
  expect_reduced(t, op, inputs, 0, got, n);
  EXPECT_TRUE(buf.guards_intact());
  // Replicas must stay identical: every rank's result has the same bits.
  Staged all(c.device(), t, n * c.size());
  c.all_gather(all.tensor(), buf.tensor());
  const Bytes gathered = all.download();
  for (int q = 0; q < c.size(); ++q) {
    expect_bytes_equal(chunk(gathered, q, n, t), got, dtype_size(t),
                       fmt::format("all_reduce result of rank {} vs this rank", q).c_str());
  }
}

void check_reduce_scatter(Communicator& c, DType t, ReduceOp op, int64_t n, bool in_place,
                          uint64_t seed) {
  SCOPED_TRACE(describe(c, in_place ? "reduce_scatter in place" : "reduce_scatter", t, n));
  const int size = c.size();
  const int rank = c.rank();
  std::vector<Bytes> inputs;
  for (int q = 0; q < size; ++q) inputs.push_back(make_values(t, seed, q, n * size));
  Staged in(c.device(), t, n * size);
  in.upload(inputs[rank]);
  Staged out(c.device(), t, n);
  const Tensor out_t = in_place ? in.tensor().slice(rank * n, (rank + 1) * n) : out.tensor();
  c.reduce_scatter_async(out_t, in.tensor(), op)->wait();
  const Bytes got = in_place ? chunk(in.download(), rank, n, t) : out.download();
  expect_reduced(t, op, inputs, rank * n, got, n);
  EXPECT_TRUE(in.guards_intact());
  if (!in_place) {
    EXPECT_TRUE(out.guards_intact());
    expect_bytes_equal(in.download(), inputs[rank], dtype_size(t), "input after reduce_scatter");
  }
}

void check_all_gather(Communicator& c, DType t, int64_t n, bool in_place, uint64_t seed) {
  SCOPED_TRACE(describe(c, in_place ? "all_gather in place" : "all_gather", t, n));
  const int size = c.size();
  const int rank = c.rank();
  std::vector<Bytes> inputs;
  for (int q = 0; q < size; ++q) inputs.push_back(make_bits(t, seed, q, n));
  Staged out(c.device(), t, n * size);
  Staged in(c.device(), t, n);
  Bytes poisoned(dtype_storage_bytes(t, n * size), 0xEE);
  if (in_place) {
    std::copy(inputs[rank].begin(), inputs[rank].end(),
              poisoned.begin() + rank * inputs[rank].size());
  } else {
    in.upload(inputs[rank]);
  }
  out.upload(poisoned);
  const Tensor in_t = in_place ? out.tensor().slice(rank * n, (rank + 1) * n) : in.tensor();
  c.all_gather_async(out.tensor(), in_t)->wait();
  expect_bytes_equal(out.download(), concat(inputs), dtype_size(t), "gathered");
  EXPECT_TRUE(out.guards_intact());
  if (!in_place) {
    EXPECT_TRUE(in.guards_intact());
    expect_bytes_equal(in.download(), inputs[rank], dtype_size(t), "input after all_gather");
  }
}

void check_broadcast(Communicator& c, DType t, int64_t n, uint64_t seed) {
  for (int root = 0; root < c.size(); ++root) {
    SCOPED_TRACE(describe(c, fmt::format("broadcast from {}", root).c_str(), t, n));
    const Bytes data = make_bits(t, seed, root, n);
    Staged buf(c.device(), t, n);
    buf.upload(c.rank() == root ? data : Bytes(data.size(), 0xEE));
    c.broadcast(buf.tensor(), root);
    expect_bytes_equal(buf.download(), data, dtype_size(t), "broadcast");
    EXPECT_TRUE(buf.guards_intact());
  }
}

void check_all_to_all_v(Communicator& c, DType t, int64_t max_count, uint64_t seed) {
  SCOPED_TRACE(describe(c, "all_to_all_v", t, max_count));
  const int size = c.size();
  const int rank = c.rank();
  // count(src, dst): what rank src sends to rank dst, known to every rank.
  const auto count = [&](int src, int dst) {
    return int64_t(draw(seed, src, dst) % uint64_t(max_count + 1));
  };
  std::vector<int64_t> send(size), recv(size);
  int64_t n_send = 0, n_recv = 0;
  for (int p = 0; p < size; ++p) {
    n_send += send[p] = count(rank, p);
    n_recv += recv[p] = count(p, rank);
  }
  // Rank src's input: its chunks for ranks 0, 1, ... in order; this rank expects, from each src,
  // the piece of src's input at src's offset for this rank.
  Bytes want;
  for (int src = 0; src < size; ++src) {
    int64_t at = 0;
    for (int q = 0; q < rank; ++q) at += count(src, q);
    const Bytes all = make_bits(t, seed + 1, src, at + count(src, rank));
    want.insert(want.end(), all.begin() + dtype_storage_bytes(t, at), all.end());
  }
  const Bytes mine = make_bits(t, seed + 1, rank, n_send);
  Staged in(c.device(), t, n_send), out(c.device(), t, n_recv), back(c.device(), t, n_send);
  in.upload(mine);
  out.upload(Bytes(dtype_storage_bytes(t, n_recv), 0xEE));
  back.upload(Bytes(dtype_storage_bytes(t, n_send), 0xEE));
  c.all_to_all_v_async(out.tensor(), recv, in.tensor(), send)->wait();
  expect_bytes_equal(out.download(), want, dtype_size(t), "received");
  c.all_to_all_v(back.tensor(), send, out.tensor(), recv);
  expect_bytes_equal(back.download(), mine, dtype_size(t), "sent back by the adjoint");
  expect_bytes_equal(in.download(), mine, dtype_size(t), "input after all_to_all_v");
  EXPECT_TRUE(in.guards_intact());
  EXPECT_TRUE(out.guards_intact());
  EXPECT_TRUE(back.guards_intact());
}

void check_ring(Communicator& c, DType t, int64_t n, bool batched, uint64_t seed) {
  SCOPED_TRACE(describe(c, batched ? "ring (batch_p2p)" : "ring (send/recv)", t, n));
  const int size = c.size();
  const int rank = c.rank();
  ASSERT_GE(size, 2) << "a ring needs two ranks";
  const int next = (rank + 1) % size;
  const int prev = (rank + size - 1) % size;
  Staged a(c.device(), t, n);
  Staged b(c.device(), t, n);
  a.upload(make_bits(t, seed, rank, n));
  Staged* cur = &a;
  Staged* other = &b;
  for (int step = 1; step <= size + 1; ++step) {
    if (batched) {
      std::vector<CommHandle> handles =
          c.batch_p2p({{true, cur->tensor(), next, step}, {false, other->tensor(), prev, step}});
      ASSERT_EQ(handles.size(), 2u);
      for (CommHandle& h : handles) h->wait();
    } else if (rank % 2 == 0) {
      CommHandle send = c.send_async(cur->tensor(), next, step);
      CommHandle recv = c.recv_async(other->tensor(), prev, step);
      recv->wait();
      send->wait();
    } else {
      CommHandle recv = c.recv_async(other->tensor(), prev, step);
      CommHandle send = c.send_async(cur->tensor(), next, step);
      send->wait();
      recv->wait();
    }
    std::swap(cur, other);
    const int origin = ((rank - step) % size + size) % size;
    expect_bytes_equal(cur->download(), make_bits(t, seed, origin, n), dtype_size(t),
                       fmt::format("step {}: data of rank {}", step, origin).c_str());
  }
  EXPECT_TRUE(a.guards_intact());
  EXPECT_TRUE(b.guards_intact());
}

void check_groups(const ParallelContext& ctx, bool device_comms) {
  const Topology& topo = ctx.topology();
  const int rank = ctx.rank();
  const int world = ctx.world_size();
  SCOPED_TRACE(fmt::format("rank {} of {}, tp {} dp {} pp {} ep {}, order {}", rank, world,
                           topo.size(Axis::tp), topo.size(Axis::dp), topo.size(Axis::pp),
                           topo.ep_size(), topo.order()));
  const RankCoord me = ctx.coord();
  EXPECT_EQ(me, topo.coord(rank));
  for (Group g : {Group::world, Group::tp, Group::dp, Group::pp, Group::embedding, Group::model,
                  Group::ep, Group::expert_dp}) {
    SCOPED_TRACE(group_name(g));
    const std::vector<int> members = expected_members(topo, g, rank);
    EXPECT_EQ(group_ranks(topo, g, rank), members);
    Communicator& c = device_comms ? ctx.comm(g) : ctx.host_comm(g);
    const int pos =
        static_cast<int>(std::find(members.begin(), members.end(), rank) - members.begin());
    EXPECT_EQ(c.size(), static_cast<int>(members.size()));
    EXPECT_EQ(c.rank(), pos);
    // With ep = 1 the expert-dp group is served by the dp communicator itself.
    const bool alias = g == Group::expert_dp && topo.ep_size() == 1;
    EXPECT_EQ(c.name(), group_name(alias ? Group::dp : g));
    EXPECT_EQ(c.device(), device_comms ? ctx.device() : Device::cpu);
    // Each rank writes its group position + 1 at its global index: the sum over the group is
    // then exactly the member list in group-rank order, and zero for every non-member.
    Bytes marks(dtype_storage_bytes(DType::i32, world), 0);
    const int32_t mark = pos + 1;
    std::memcpy(marks.data() + 4 * rank, &mark, 4);
    Staged buf(c.device(), DType::i32, world);
    buf.upload(marks);
    c.all_reduce(buf.tensor(), ReduceOp::sum);
    const Bytes got = buf.download();
    for (int q = 0; q < world; ++q) {
      const auto it = std::find(members.begin(), members.end(), q);
      const double want = it == members.end() ? 0.0 : static_cast<double>(it - members.begin() + 1);
      EXPECT_EQ(load(DType::i32, got, q), want) << "global rank " << q;
    }
  }
  EXPECT_EQ(ctx.host_comm(Group::tp).rank(), me.tp_rank);
  EXPECT_EQ(ctx.host_comm(Group::dp).rank(), me.dp_rank);
  EXPECT_EQ(ctx.host_comm(Group::pp).rank(), me.pp_rank);
}

}  // namespace tessera::testing

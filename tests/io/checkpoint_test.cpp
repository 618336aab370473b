// Checkpoint tests: bit-exact round trips per dtype, a 2-rank sharded save read back under other
// layouts (every sub-box), keep-K pruning, crash leftovers being ignored, atomic replacement, and
// missing/corrupt/truncated inputs reported as user errors naming the file.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include "io/checkpoint.h"
#include "io/fs_util.h"
#include "io_test_util.h"

namespace tessera::io {
namespace {

namespace fs = std::filesystem;
using testing::bit_equal;
using testing::box2d;
using testing::expect_error;
using testing::iota_values;
using testing::ScratchDir;

TensorSlice whole(const std::string& name, DType dtype, std::vector<int64_t> shape,
                  const void* data) {
  return {name, dtype, shape, std::vector<int64_t>(shape.size(), 0), shape, data};
}

template <class T>
std::vector<T> read_all(const CheckpointReader& r, const std::string& name) {
  std::vector<T> out(size_t(r.numel(name)));
  r.read_full(name, out.data());
  return out;
}

// Writes one whole f32 tensor "w" holding `value` everywhere, as a single process.
std::string save_simple(const std::string& root, int64_t step, float value, int keep) {
  const std::vector<float> w(6, value);
  CheckpointWriter writer(root, step, 0, 1);
  writer.add(whole("w", DType::f32, {2, 3}, w.data()));
  writer.set_meta("step", std::to_string(step));
  return writer.commit(keep);
}

float read_first_w(const std::string& step_dir) {
  return read_all<float>(CheckpointReader::open(step_dir), "w")[0];
}

TEST(Checkpoint, SingleProcessRoundTripIsBitExact) {
  ScratchDir dir;
  std::vector<float> f32 = iota_values<float>(3 * 5, -1.5, 0.37);
  f32[0] = std::numeric_limits<float>::quiet_NaN();
  f32[1] = -0.0f;
  f32[2] = std::numeric_limits<float>::denorm_min();
  f32[3] = -std::numeric_limits<float>::infinity();
  const std::vector<double> f64 = iota_values<double>(4 * 2 * 3, 1e-300, 1.0 / 3.0);
  const std::vector<int32_t> i32 = iota_values<int32_t>(7, -2147483648.0, 613566756.0);
  const std::vector<int8_t> i8 = iota_values<int8_t>(5, -128, 63);
  const std::vector<uint16_t> bf16 = iota_values<uint16_t>(4, 0x3f80, 0x1111);
  const float scale = 65536.0f;
  const std::vector<float> empty;

  const std::string recipe = "model:\n  layers: 2  # unicode: \xce\xbb\n";
  CheckpointWriter w(dir.str(), 12, 0, 1);
  w.add(whole("layers.0.attn.wq.weight", DType::f32, {3, 5}, f32.data()));
  w.add(whole("optim.m.layers.0.attn.wq.weight", DType::f64, {4, 2, 3}, f64.data()));
  w.add(whole("loader.positions", DType::i32, {7}, i32.data()));
  w.add(whole("qat.codes", DType::i8, {5}, i8.data()));
  w.add(whole("cast.bf16", DType::bf16, {2, 2}, bf16.data()));
  w.add(whole("scaler.scale", DType::f32, {}, &scale));
  w.add(whole("empty.rows", DType::f32, {0, 4}, empty.data()));
  w.set_meta("recipe", recipe);
  w.set_meta("rng", "seed=1234 counter=99");
  w.set_meta("note", "first");
  w.set_meta("note", "");  // last value wins, empty allowed
  const std::string step_dir = w.commit(3);

  EXPECT_EQ(step_dir, checkpoints_dir(dir.str()) + "/step_12");
  EXPECT_EQ(latest_checkpoint(dir.str()), step_dir);
  const CheckpointReader r = CheckpointReader::open(step_dir);
  EXPECT_EQ(r.step(), 12);
  EXPECT_EQ(r.num_shards(), 1);
  EXPECT_EQ(r.tensor_names(),
            (std::vector<std::string>{"cast.bf16", "empty.rows", "layers.0.attn.wq.weight",
                                      "loader.positions", "optim.m.layers.0.attn.wq.weight",
                                      "qat.codes", "scaler.scale"}));
  EXPECT_EQ(r.dtype("optim.m.layers.0.attn.wq.weight"), DType::f64);
  EXPECT_EQ(r.dtype("cast.bf16"), DType::bf16);
  EXPECT_EQ(r.global_shape("optim.m.layers.0.attn.wq.weight"), (std::vector<int64_t>{4, 2, 3}));
  EXPECT_EQ(r.global_shape("scaler.scale"), std::vector<int64_t>{});
  EXPECT_TRUE(bit_equal(read_all<float>(r, "layers.0.attn.wq.weight"), f32));
  EXPECT_TRUE(bit_equal(read_all<double>(r, "optim.m.layers.0.attn.wq.weight"), f64));
  EXPECT_TRUE(bit_equal(read_all<int32_t>(r, "loader.positions"), i32));
  EXPECT_TRUE(bit_equal(read_all<int8_t>(r, "qat.codes"), i8));
  EXPECT_TRUE(bit_equal(read_all<uint16_t>(r, "cast.bf16"), bf16));
  EXPECT_EQ(read_all<float>(r, "scaler.scale"), std::vector<float>{scale});
  EXPECT_EQ(read_all<float>(r, "empty.rows").size(), 0u);
  EXPECT_EQ(r.meta("recipe"), recipe);
  EXPECT_EQ(r.meta("rng"), "seed=1234 counter=99");
  EXPECT_EQ(r.meta("note"), "");
  EXPECT_TRUE(r.has_meta("recipe"));
  EXPECT_FALSE(r.has_meta("loader"));
  EXPECT_EQ(r.meta_keys(), (std::vector<std::string>{"note", "recipe", "rng"}));
}

TEST(Checkpoint, TwoRankShardsReassembleUnderAnyLayout) {
  ScratchDir dir;
  // a: (6, 5) split unevenly along dim 0; b: (4, 7) split along dim 1.
  const std::vector<float> a = iota_values<float>(6 * 5, 0.5, 1.25);
  const std::vector<double> b = iota_values<double>(4 * 7, -3.0, 0.1);
  const std::vector<int32_t> c = iota_values<int32_t>(3, 7, 11);
  {
    CheckpointWriter r0(dir.str(), 40, 0, 2), r1(dir.str(), 40, 1, 2);
    const std::vector<float> a0 = box2d(a, 5, 0, 0, 4, 5), a1 = box2d(a, 5, 4, 0, 2, 5);
    const std::vector<double> b0 = box2d(b, 7, 0, 0, 4, 3), b1 = box2d(b, 7, 0, 3, 4, 4);
    r1.add({"a", DType::f32, {6, 5}, {4, 0}, {2, 5}, a1.data()});
    r0.add({"a", DType::f32, {6, 5}, {0, 0}, {4, 5}, a0.data()});
    r0.add({"b", DType::f64, {4, 7}, {0, 0}, {4, 3}, b0.data()});
    r1.add({"b", DType::f64, {4, 7}, {0, 3}, {4, 4}, b1.data()});
    r1.add(whole("c", DType::i32, {3}, c.data()));  // a tensor only rank 1 holds
    r0.set_meta("recipe", "parallel: {tp: 2}");
    r1.write_shard();
    // Before rank 0 finalizes, nothing is visible.
    r0.write_shard();
    EXPECT_EQ(latest_checkpoint(dir.str()), "");
    EXPECT_EQ(r0.finalize(0), checkpoints_dir(dir.str()) + "/step_40");
  }
  const CheckpointReader r = CheckpointReader::open(latest_checkpoint(dir.str()));
  EXPECT_EQ(r.num_shards(), 2);
  EXPECT_EQ(r.meta("recipe"), "parallel: {tp: 2}");
  EXPECT_TRUE(bit_equal(read_all<float>(r, "a"), a));
  EXPECT_TRUE(bit_equal(read_all<double>(r, "b"), b));
  EXPECT_TRUE(bit_equal(read_all<int32_t>(r, "c"), c));
  // Every sub-box of b (crossing the dim-1 split or not) and a sample of a's.
  for (int64_t r0 = 0; r0 < 4; ++r0)
    for (int64_t nr = 1; r0 + nr <= 4; ++nr)
      for (int64_t c0 = 0; c0 < 7; ++c0)
        for (int64_t nc = 1; c0 + nc <= 7; ++nc) {
          std::vector<double> got(size_t(nr * nc));
          r.read_slice("b", {r0, c0}, {nr, nc}, got.data());
          ASSERT_TRUE(bit_equal(got, box2d(b, 7, r0, c0, nr, nc)))
              << "box at (" << r0 << "," << c0 << ") of (" << nr << "," << nc << ")";
        }
  // a re-split column-wise (another tp layout): the halves straddle rank 0's and 1's rows.
  for (int64_t c0 : {0, 2}) {
    const int64_t nc = c0 == 0 ? 2 : 3;
    std::vector<float> got(size_t(6 * nc));
    r.read_slice("a", {0, c0}, {6, nc}, got.data());
    EXPECT_TRUE(bit_equal(got, box2d(a, 5, 0, c0, 6, nc)));
  }
  std::vector<float> got(6);
  r.read_slice("a", {3, 1}, {2, 3}, got.data());
  EXPECT_TRUE(bit_equal(got, box2d(a, 5, 3, 1, 2, 3)));
}

TEST(Checkpoint, UncoveredElementsAndOverlapsAreUserErrors) {
  ScratchDir dir;
  const std::vector<float> top = iota_values<float>(2 * 3, 1, 1);
  const std::vector<float> all = iota_values<float>(12, 1, 1);
  {
    CheckpointWriter r0(dir.str(), 1, 0, 2), r1(dir.str(), 1, 1, 2);
    r0.add({"half", DType::f32, {4, 3}, {0, 0}, {2, 3}, top.data()});  // rows 2..3 missing
    r0.write_shard();
    r1.write_shard();
    r0.finalize(0);
  }
  const CheckpointReader r = CheckpointReader::open(latest_checkpoint(dir.str()));
  std::vector<float> buf(12);
  r.read_slice("half", {0, 0}, {2, 3}, buf.data());
  expect_error([&] { r.read_full("half", buf.data()); }, ErrorKind::user,
               {"half", "6 of the 12", "in no shard", r.path()});
  expect_error(
      [&] {
        r.read_slice("half", {3, 0}, {2, 3}, buf.data());
      },
      ErrorKind::user, {"half", "does not fit", "(4, 3)"});
  expect_error([&] { r.read_full("nope", buf.data()); }, ErrorKind::user, {"nope", r.path()});

  ScratchDir dir2;
  {
    CheckpointWriter r0(dir2.str(), 1, 0, 2), r1(dir2.str(), 1, 1, 2);
    r0.add(whole("dup", DType::f32, {4, 3}, all.data()));
    r1.add({"dup", DType::f32, {4, 3}, {1, 0}, {1, 3}, all.data()});
    r0.write_shard();
    r1.write_shard();
    r0.finalize(0);
  }
  expect_error([&] { CheckpointReader::open(latest_checkpoint(dir2.str())); }, ErrorKind::user,
               {"dup", "overlap", "shard_1_of_2.h5"});
}

TEST(Checkpoint, KeepsNewestK) {
  ScratchDir dir;
  for (int64_t step = 1; step <= 5; ++step) save_simple(dir.str(), step * 10, float(step), 2);
  std::vector<int64_t> steps;
  for (const StepDir& d : list_step_dirs(checkpoints_dir(dir.str()))) steps.push_back(d.step);
  EXPECT_EQ(steps, (std::vector<int64_t>{40, 50}));
  EXPECT_EQ(read_first_w(latest_checkpoint(dir.str())), 5.0f);

  save_simple(dir.str(), 60, 6.0f, 0);  // keep = 0 keeps everything
  EXPECT_EQ(list_step_dirs(checkpoints_dir(dir.str())).size(), 3u);
  const std::vector<std::string> removed = prune_checkpoints(dir.str(), 1);
  EXPECT_EQ(removed.size(), 2u);
  ASSERT_EQ(list_step_dirs(checkpoints_dir(dir.str())).size(), 1u);
  EXPECT_EQ(latest_checkpoint(dir.str()), checkpoints_dir(dir.str()) + "/step_60");
  // Only step_60 and nothing else (no trash left behind).
  EXPECT_EQ(
      std::distance(fs::directory_iterator(checkpoints_dir(dir.str())), fs::directory_iterator()),
      1);
}

TEST(Checkpoint, InterruptedWritesAreIgnoredAndCleanedUp) {
  ScratchDir dir;
  const std::string first = save_simple(dir.str(), 1, 1.0f, 3);
  const std::string ck = checkpoints_dir(dir.str());
  {
    // A crash after every rank wrote its shard but before rank 0 committed.
    CheckpointWriter w(dir.str(), 2, 0, 1);
    const std::vector<float> v(6, 2.0f);
    w.add(whole("w", DType::f32, {2, 3}, v.data()));
    w.write_shard();
  }
  {
    // A crash mid-write (the writer is destroyed without write_shard).
    CheckpointWriter w(dir.str(), 3, 0, 1);
    const std::vector<float> v(6, 3.0f);
    w.add(whole("w", DType::f32, {2, 3}, v.data()));
  }
  // A step directory without its marker (e.g. copied by hand) is not complete either.
  fs::create_directories(ck + "/step_9");
  fs::copy_file(ck + "/.tmp-step_2/shard_0_of_1.h5", ck + "/step_9/shard_0_of_1.h5");
  EXPECT_EQ(latest_checkpoint(dir.str()), first);
  EXPECT_EQ(resolve_resume(dir.str(), "latest"), first);
  expect_error([&] { resolve_resume(dir.str(), ck + "/step_9"); }, ErrorKind::user,
               {"checkpoint.resume", "step_9", "not a complete checkpoint"});
  expect_error([&] { CheckpointReader::open(ck + "/.tmp-step_2"); }, ErrorKind::user,
               {".tmp-step_2", "COMPLETE"});

  // The next commit (step 5) removes the stale temporaries of earlier steps.
  save_simple(dir.str(), 5, 5.0f, 3);
  EXPECT_FALSE(fs::exists(ck + "/.tmp-step_2"));
  EXPECT_FALSE(fs::exists(ck + "/.tmp-step_3"));
  EXPECT_EQ(read_first_w(latest_checkpoint(dir.str())), 5.0f);
}

TEST(Checkpoint, FailedWritesLeaveThePreviousCheckpoint) {
  ScratchDir dir;
  const std::string first = save_simple(dir.str(), 1, 1.0f, 3);
  const std::string ck = checkpoints_dir(dir.str());
  // The temporary directory cannot be created (a file is in the way).
  std::ofstream(ck + "/.tmp-step_2") << "in the way";
  expect_error([&] { save_simple(dir.str(), 2, 2.0f, 3); }, ErrorKind::system, {".tmp-step_2"});
  fs::remove(ck + "/.tmp-step_2");
  // Rank 0 finalizes while rank 1's shard was never written.
  {
    CheckpointWriter r0(dir.str(), 3, 0, 2);
    r0.write_shard();
    expect_error([&] { r0.finalize(3); }, ErrorKind::system, {"shard_1_of_2.h5", "missing"});
  }
  EXPECT_FALSE(fs::exists(ck + "/step_3"));
  EXPECT_EQ(latest_checkpoint(dir.str()), first);
  EXPECT_EQ(read_first_w(first), 1.0f);
}

TEST(Checkpoint, StaleShardsOfAnotherWorldSizeAreDropped) {
  ScratchDir dir;
  const std::string tmp = checkpoints_dir(dir.str()) + "/.tmp-step_7";
  fs::create_directories(tmp);
  std::ofstream(tmp + "/shard_3_of_4.h5") << "from a crashed 4-rank attempt";
  std::ofstream(tmp + "/COMPLETE") << "stale";
  const std::string step_dir = save_simple(dir.str(), 7, 7.0f, 3);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(step_dir)) names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"COMPLETE", "shard_0_of_1.h5"}));
  EXPECT_EQ(read_first_w(step_dir), 7.0f);
}

TEST(Checkpoint, SameStepIsReplacedAtomically) {
  ScratchDir dir;
  save_simple(dir.str(), 5, 1.0f, 3);
  const std::string again = save_simple(dir.str(), 5, 2.0f, 3);
  EXPECT_EQ(read_first_w(again), 2.0f);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(checkpoints_dir(dir.str())))
    names.push_back(e.path().filename());
  EXPECT_EQ(names, std::vector<std::string>{"step_5"});
}

TEST(Checkpoint, MissingCorruptAndTruncatedInputsAreUserErrors) {
  ScratchDir dir;
  // Distinctive int32 payload so the test can find the data bytes in the file and flip one.
  std::vector<int32_t> payload(256);
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = int32_t(0x5A17C000u + i);
  auto save = [&](int64_t step) {
    CheckpointWriter w(dir.str(), step, 0, 1);
    w.add(whole("payload", DType::i32, {16, 16}, payload.data()));
    w.set_meta("recipe", "x: 1");
    return w.commit(0);
  };
  const std::string ck = checkpoints_dir(dir.str());
  expect_error([&] { CheckpointReader::open(ck + "/step_404"); }, ErrorKind::user,
               {"step_404", "does not exist"});
  expect_error([&] { resolve_resume(dir.str(), ck + "/step_404"); }, ErrorKind::user,
               {"checkpoint.resume", "step_404", "does not exist"});
  EXPECT_EQ(resolve_resume(dir.str(), ""), "");

  // Missing meta key.
  const std::string s1 = save(1);
  expect_error([&] { CheckpointReader::open(s1).meta("loader"); }, ErrorKind::user,
               {"loader", s1, "recipe"});

  // A flipped data byte fails the Fletcher-32 check on read.
  const std::string s2 = save(2), shard2 = s2 + "/shard_0_of_1.h5";
  {
    std::fstream f(shard2, std::ios::in | std::ios::out | std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    const size_t at = bytes.find(std::string(reinterpret_cast<const char*>(payload.data()), 64));
    ASSERT_NE(at, std::string::npos);
    f.seekp(std::streamoff(at + 100));
    f.put(char(bytes[at + 100] ^ 0x40));
  }
  {
    const CheckpointReader r = CheckpointReader::open(s2);
    std::vector<int32_t> out(payload.size());
    expect_error([&] { r.read_full("payload", out.data()); }, ErrorKind::user, {shard2, "corrupt"});
  }

  // Truncated to half its size.
  const std::string s3 = save(3), shard3 = s3 + "/shard_0_of_1.h5";
  fs::resize_file(shard3, fs::file_size(shard3) / 2);
  expect_error([&] { CheckpointReader::open(s3); }, ErrorKind::user, {shard3});

  // Not HDF5 at all.
  const std::string s4 = save(4), shard4 = s4 + "/shard_0_of_1.h5";
  std::ofstream(shard4, std::ios::trunc) << "not an hdf5 file\n";
  expect_error([&] { CheckpointReader::open(s4); }, ErrorKind::user, {shard4, "not an HDF5 file"});

  // A shard deleted.
  const std::string s5 = save(5), shard5 = s5 + "/shard_0_of_1.h5";
  fs::remove(shard5);
  expect_error([&] { CheckpointReader::open(s5); }, ErrorKind::user, {shard5, "missing"});
}

TEST(Checkpoint, MisuseIsABug) {
  ScratchDir dir;
  const std::vector<float> v(4, 1.0f);
  CheckpointWriter r1(dir.str(), 1, 1, 2);
  expect_error([&] { r1.set_meta("recipe", "x"); }, ErrorKind::bug, {"rank 1"});
  expect_error(
      [&] {
        r1.add({"w", DType::f32, {4}, {2}, {3}, v.data()});
      },
      ErrorKind::bug, {"outside global shape"});
  expect_error([&] { r1.add(whole("a/b", DType::f32, {4}, v.data())); }, ErrorKind::bug, {"a/b"});
  expect_error([&] { r1.add(whole("packed", DType::i4, {4}, v.data())); }, ErrorKind::bug,
               {"int4"});
  r1.add(whole("w", DType::f32, {4}, v.data()));
  expect_error([&] { r1.add(whole("w", DType::f32, {4}, v.data())); }, ErrorKind::bug,
               {"added twice"});
  expect_error([&] { r1.commit(1); }, ErrorKind::bug, {"world 2"});
}

}  // namespace
}  // namespace tessera::io

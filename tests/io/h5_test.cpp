// The one HDF5 layer (io/h5.h, used by checkpoints, inspect and token datasets): attribute and
// string round trips in both string layouts, growable 1-D streams, generic listing helpers, and
// the blame rules (a bad user file is a user error naming it; HDF5 prints nothing itself).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "io/h5.h"
#include "io_test_util.h"

namespace tessera::io {
namespace {

namespace fs = std::filesystem;
using testing::expect_error;
using testing::ScratchDir;

TEST(H5, AttributesStringsAndListingRoundTrip) {
  ScratchDir dir;
  const std::string path = dir / "a.h5";
  {
    h5::File f = h5::File::create(path);
    const h5::Ctx& ctx = f.ctx();
    h5::Handle g = h5::create_group(ctx, f.id(), "grp");
    h5::write_attr_i64s(ctx, g.id(), "shape", {3, -4, int64_t(1) << 40});
    h5::write_attr_i64s(ctx, g.id(), "empty", {});
    h5::write_attr_string(ctx, g.id(), "name", "layers.0 \xce\xbb");
    h5::write_string_dataset(ctx, g.id(), "text", std::string(100000, 'y'));
    h5::write_string_dataset(ctx, g.id(), "blank", "");
    const std::vector<float> v = {1, 2, 3, 4, 5, 6};
    h5::Handle d = h5::create_dataset(ctx, f.id(), "data", H5T_IEEE_F32LE, {2, 3}, 4, true);
    h5::write_dataset(ctx, d.id(), H5T_NATIVE_FLOAT, v.data(), "data");
    d.close(ctx, "H5Dclose");
    g.close(ctx, "H5Gclose");
    f.close();
  }
  h5::File f = h5::File::open_read(path);
  const h5::Ctx& ctx = f.ctx();
  EXPECT_EQ(h5::link_names(ctx, f.id()), (std::vector<std::string>{"data", "grp"}));
  EXPECT_EQ(h5::object_kind(ctx, f.id(), "grp"), h5::ObjectKind::group);
  EXPECT_EQ(h5::object_kind(ctx, f.id(), "data"), h5::ObjectKind::dataset);
  h5::Handle g = h5::open_group(ctx, f.id(), "grp");
  EXPECT_EQ(h5::read_attr_i64s(ctx, g.id(), "shape"),
            (std::vector<int64_t>{3, -4, int64_t(1) << 40}));
  EXPECT_TRUE(h5::read_attr_i64s(ctx, g.id(), "empty").empty());
  EXPECT_EQ(h5::read_attr_string(ctx, g.id(), "name"), "layers.0 \xce\xbb");
  EXPECT_EQ(h5::read_string_dataset(ctx, g.id(), "text"), std::string(100000, 'y'));
  EXPECT_EQ(h5::read_string_dataset(ctx, g.id(), "blank"), "");
  EXPECT_EQ(h5::attr_names(ctx, g.id()), (std::vector<std::string>{"empty", "name", "shape"}));
  EXPECT_EQ(h5::attr_value_text(ctx, g.id(), "shape", 80), "[3, -4, 1099511627776]");
  EXPECT_EQ(h5::attr_value_text(ctx, g.id(), "name", 4), "laye...");
  EXPECT_TRUE(h5::attr_exists(ctx, g.id(), "name"));
  EXPECT_FALSE(h5::attr_exists(ctx, g.id(), "nope"));
  h5::Handle d = h5::open_dataset(ctx, f.id(), "data");
  EXPECT_EQ(h5::dataset_dims(ctx, d.id(), "data"), (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(h5::dataset_type_text(ctx, d.id(), "data"), "f32");
  std::vector<float> col(2 * 2, -1.0f);  // read column 2 into column 1 of a (2, 2) buffer
  h5::read_box(ctx, d.id(), H5T_NATIVE_FLOAT, {0, 2}, {2, 1}, col.data(), {2, 2}, {0, 1}, "data");
  EXPECT_EQ(col, (std::vector<float>{-1, 3, -1, 6}));
  // A user file missing an object: user error naming object and file, nothing on stderr.
  ::testing::internal::CaptureStderr();
  expect_error([&] { h5::open_dataset(ctx, f.id(), "absent"); }, ErrorKind::user,
               {"missing dataset 'absent'", path});
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
}

TEST(H5, BadUserFilesAreUserErrors) {
  ScratchDir dir;
  expect_error([&] { h5::File::open_read(dir / "nope.h5"); }, ErrorKind::user,
               {"nope.h5", "does not exist"});
  expect_error([&] { h5::File::open_read(dir.str()); }, ErrorKind::user, {"is a directory"});
  std::ofstream(dir / "text.h5") << "plain text";
  expect_error([&] { h5::File::open_read(dir / "text.h5"); }, ErrorKind::user,
               {"text.h5", "not an HDF5 file"});
  {
    h5::File f = h5::File::create(dir / "big.h5");
    const std::vector<double> v(50000, 1.0);
    h5::Handle d = h5::create_dataset(f.ctx(), f.id(), "v", H5T_IEEE_F64LE, {50000}, 8, false);
    h5::write_dataset(f.ctx(), d.id(), H5T_NATIVE_DOUBLE, v.data(), "v");
    d.close(f.ctx(), "H5Dclose");
    f.close();
  }
  fs::resize_file(dir / "big.h5", 2000);
  ::testing::internal::CaptureStderr();
  expect_error([&] { h5::File::open_read(dir / "big.h5"); }, ErrorKind::user,
               {"big.h5", "corrupt or truncated"});
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
  // Creating a file where it cannot be: the system is blamed.
  expect_error([&] { h5::File::create(dir / "no/such/dir/x.h5"); }, ErrorKind::system,
               {"H5Fcreate", "no/such/dir/x.h5"});
}

TEST(H5, ScalarAndVlenAttributesReplaceAndReadBack) {
  ScratchDir dir;
  const std::string path = dir / "s.h5";
  const std::string big(200000, 'j');  // beyond the 64 KiB an object header can hold
  {
    h5::File f = h5::File::create(path);
    const h5::Ctx& ctx = f.ctx();
    h5::write_attr_i64(ctx, f.id(), "version", 1);
    h5::write_attr_i64(ctx, f.id(), "version", -(int64_t(1) << 50));  // replaces
    h5::write_attr_f64(ctx, f.id(), "fraction", 0.05);
    h5::write_attr_string(ctx, f.id(), "json", big, h5::StrType::vlen);
    h5::write_attr_string(ctx, f.id(), "empty", "", h5::StrType::vlen);
    h5::write_attr_strings(ctx, f.id(), "names", {"a.txt", "", "\xc3\xa9.json"});
    h5::write_attr_strings(ctx, f.id(), "none", {});
    f.close();
  }
  h5::File f = h5::File::open_read(path);
  const h5::Ctx& ctx = f.ctx();
  EXPECT_EQ(h5::read_attr_i64(ctx, f.id(), "version"), -(int64_t(1) << 50));
  EXPECT_EQ(h5::read_attr_f64(ctx, f.id(), "fraction"), 0.05);
  EXPECT_EQ(h5::read_attr_f64(ctx, f.id(), "version"), -double(int64_t(1) << 50));  // int as f64
  EXPECT_EQ(h5::read_attr_string(ctx, f.id(), "json"), big);
  EXPECT_EQ(h5::read_attr_string(ctx, f.id(), "empty"), "");
  EXPECT_EQ(h5::read_attr_strings(ctx, f.id(), "names"),
            (std::vector<std::string>{"a.txt", "", "\xc3\xa9.json"}));
  EXPECT_TRUE(h5::read_attr_strings(ctx, f.id(), "none").empty());
  EXPECT_EQ(h5::attr_value_text(ctx, f.id(), "json", 3), "jjj...");
  // Wrong class, wrong count and absence: user errors naming the attribute and the file.
  expect_error([&] { h5::read_attr_i64(ctx, f.id(), "fraction"); }, ErrorKind::user,
               {path, "'fraction'", "an integer", "f64"});
  expect_error([&] { h5::read_attr_string(ctx, f.id(), "names"); }, ErrorKind::user,
               {path, "'names'", "3 strings"});
  expect_error([&] { h5::read_attr_string(ctx, f.id(), "version"); }, ErrorKind::user,
               {path, "'version'", "strings"});
  expect_error([&] { h5::read_attr_i64(ctx, f.id(), "absent"); }, ErrorKind::user,
               {path, "missing attribute 'absent'"});
  // The same problem in a file we write is the system's fault, not the user's.
  const h5::Ctx ours{path, h5::Blame::system};
  expect_error([&] { h5::read_attr_i64(ours, f.id(), "absent"); }, ErrorKind::system,
               {path, "missing attribute 'absent'"});
}

TEST(H5, GrowableStreamsAppendAndReadRanges) {
  ScratchDir dir;
  const std::string path = dir / "g.h5";
  const std::vector<uint32_t> ids = testing::iota_values<uint32_t>(10000, 3, 5);
  {
    h5::File f = h5::File::create(path);
    const h5::Ctx& ctx = f.ctx();
    h5::Handle g = h5::create_group(ctx, f.id(), "train");
    h5::Handle d = h5::create_growable_1d(ctx, g.id(), "tokens", H5T_STD_U16LE, 1024);
    // Appends of awkward sizes that straddle chunk boundaries, converted u32 -> u16 on write.
    int64_t done = 0;
    for (int64_t n : {0, 1, 1023, 1500, 7476}) {
      h5::append_1d(ctx, d.id(), H5T_NATIVE_UINT32, ids.data() + done, n, "tokens");
      done += n;
    }
    ASSERT_EQ(done, 10000);
    d.close(ctx, "H5Dclose");
    h5::Handle e = h5::create_growable_1d(ctx, g.id(), "empty", H5T_STD_I64LE, 16);
    e.close(ctx, "H5Dclose");
    g.close(ctx, "H5Gclose");
    f.close();
  }
  h5::File f = h5::File::open_read(path);
  const h5::Ctx& ctx = f.ctx();
  EXPECT_TRUE(h5::link_exists(ctx, f.id(), "/train/tokens"));
  EXPECT_FALSE(h5::link_exists(ctx, f.id(), "/val/tokens"));  // a missing parent is no error
  expect_error([&] { h5::open_dataset(ctx, f.id(), "/val/tokens"); }, ErrorKind::user,
               {path, "missing dataset '/val/tokens'"});
  h5::Handle d = h5::open_dataset(ctx, f.id(), "/train/tokens", size_t(8) << 20);
  const h5::IntegerInfo info = h5::integer_1d_info(ctx, d.id(), "/train/tokens");
  EXPECT_EQ(info.length, 10000);
  EXPECT_EQ(info.size_bytes, 2u);
  EXPECT_FALSE(info.is_signed);
  std::vector<uint16_t> part(1500);
  h5::read_1d(ctx, d.id(), H5T_NATIVE_UINT16, 1000, 1500, part.data(), "/train/tokens");
  for (size_t i = 0; i < part.size(); ++i) EXPECT_EQ(part[i], uint16_t(ids[1000 + i])) << i;
  h5::Handle e = h5::open_dataset(ctx, f.id(), "/train/empty");
  EXPECT_EQ(h5::integer_1d_info(ctx, e.id(), "/train/empty").length, 0);
  // Reading past the end is refused by HDF5: a user error on a user's file.
  expect_error(
      [&] { h5::read_1d(ctx, d.id(), H5T_NATIVE_UINT16, 9000, 1500, part.data(), "tokens"); },
      ErrorKind::user, {path, "'tokens'"});
}

}  // namespace
}  // namespace tessera::io

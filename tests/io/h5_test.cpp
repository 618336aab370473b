// h5 wrapper tests: attribute and string round trips, generic listing helpers, and the blame
// rules (a bad user file is a user error naming it; HDF5 prints nothing itself).
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
               {"absent", path, "H5Dopen2"});
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

}  // namespace
}  // namespace tessera::io

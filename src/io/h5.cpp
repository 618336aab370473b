// Checked HDF5 wrappers (see h5.h). Each HDF5 call's result goes through check/check_id/check_tri,
// which read the HDF5 error stack before anything else can clear it.
#include "io/h5.h"

#include <algorithm>
#include <filesystem>
#include <functional>
#include <mutex>
#include <system_error>

#include "core/error.h"

namespace tessera::io::h5 {

namespace {

// Chunks of checksummed datasets hold at most this many bytes: small enough that reading a
// sub-box touches little extra data, large enough that per-chunk overhead is negligible.
constexpr int64_t kMaxChunkBytes = int64_t(4) << 20;

herr_t collect_error(unsigned /*n*/, const H5E_error2_t* err, void* data) {
  auto* out = static_cast<std::vector<std::string>*>(data);
  if (err->desc && err->desc[0]) out->push_back(err->desc);
  return 0;
}

std::string where(const Ctx& ctx, const std::string& obj) {
  return obj.empty() ? ctx.path : fmt::format("'{}' in {}", obj, ctx.path);
}

std::vector<hsize_t> to_hsize(const std::vector<int64_t>& v) {
  return std::vector<hsize_t>(v.begin(), v.end());
}

Handle make_plist(const Ctx& ctx, hid_t cls, const char* what) {
  return Handle(check_id(H5Pcreate(cls), ctx, what), H5Pclose);
}

Handle file_access_plist(const Ctx& ctx) {
  Handle fapl = make_plist(ctx, H5P_FILE_ACCESS, "H5Pcreate(H5P_FILE_ACCESS)");
#if H5_VERSION_GE(1, 10, 7)
  // Shared file systems without flock() support (some NFS/Lustre mounts) would otherwise refuse
  // to open any file; checkpoint writers never share a file, so locking is only a safety net.
  check(H5Pset_file_locking(fapl.id(), true, true), ctx, "H5Pset_file_locking");
#endif
  return fapl;
}

Handle scalar_or_simple_space(const Ctx& ctx, const std::vector<int64_t>& dims,
                              const std::string& obj) {
  if (dims.empty()) return Handle(check_id(H5Screate(H5S_SCALAR), ctx, "H5Screate", obj), H5Sclose);
  const std::vector<hsize_t> h = to_hsize(dims);
  return Handle(
      check_id(H5Screate_simple(int(h.size()), h.data(), nullptr), ctx, "H5Screate_simple", obj),
      H5Sclose);
}

// A fixed-length, NUL-padded UTF-8 string type of `size` bytes (size >= 1).
Handle fixed_string_type(const Ctx& ctx, size_t size, const std::string& obj) {
  Handle t(check_id(H5Tcopy(H5T_C_S1), ctx, "H5Tcopy", obj), H5Tclose);
  check(H5Tset_size(t.id(), size), ctx, "H5Tset_size", obj);
  check(H5Tset_strpad(t.id(), H5T_STR_NULLPAD), ctx, "H5Tset_strpad", obj);
  check(H5Tset_cset(t.id(), H5T_CSET_UTF8), ctx, "H5Tset_cset", obj);
  return t;
}

std::string strip_nul_padding(std::string s) {
  while (!s.empty() && s.back() == '\0') s.pop_back();
  return s;
}

// Reads a fixed-length string value from a dataset or attribute whose type is `type`.
std::string read_fixed_string(const Ctx& ctx, hid_t type, int64_t num_points,
                              const std::string& obj,
                              const std::function<herr_t(hid_t, void*)>& read) {
  const bool is_fixed_string = H5Tget_class(type) == H5T_STRING &&
                               !check_tri(H5Tis_variable_str(type), ctx, "H5Tis_variable_str", obj);
  if (!is_fixed_string || num_points != 1)
    TS_USER_ERROR("{}: expected one fixed-length string, found {} value(s) of type {}",
                  where(ctx, obj), num_points, type_text(type));
  const size_t size = H5Tget_size(type);
  if (size == 0) fail(ctx, "H5Tget_size", obj);
  Handle mem = fixed_string_type(ctx, size, obj);
  std::string buf(size, '\0');
  check(read(mem.id(), buf.data()), ctx, "H5Dread/H5Aread", obj);
  return strip_nul_padding(std::move(buf));
}

}  // namespace

void quiet_errors() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr) < 0)
      TS_SYSTEM_ERROR("H5Eset_auto2: cannot silence the HDF5 error printer");
  });
}

std::string error_stack_text() {
  std::vector<std::string> descs;
  if (H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, collect_error, &descs) < 0) return "";
  // Downward walk: the API call's message first, the innermost cause last.
  if (descs.empty()) return "";
  if (descs.size() == 1) return descs.front();
  return fmt::format("{} ({})", descs.front(), descs.back());
}

void fail(const Ctx& ctx, const char* call, const std::string& obj) {
  std::string text = error_stack_text();
  H5Eclear2(H5E_DEFAULT);
  if (text.empty()) text = "no HDF5 error message";
  if (ctx.blame == Blame::file)
    TS_USER_ERROR("HDF5 file {} is corrupt or truncated: {} failed{}: {}", ctx.path, call,
                  obj.empty() ? std::string() : fmt::format(" on '{}'", obj), text);
  TS_SYSTEM_ERROR("HDF5 {} failed on {}: {}", call, where(ctx, obj), text);
}

hid_t check_id(hid_t id, const Ctx& ctx, const char* call, const std::string& obj) {
  if (id < 0) fail(ctx, call, obj);
  return id;
}

void check(herr_t rc, const Ctx& ctx, const char* call, const std::string& obj) {
  if (rc < 0) fail(ctx, call, obj);
}

bool check_tri(htri_t rc, const Ctx& ctx, const char* call, const std::string& obj) {
  if (rc < 0) fail(ctx, call, obj);
  return rc > 0;
}

Handle& Handle::operator=(Handle&& o) noexcept {
  if (this != &o) {
    reset();
    id_ = o.id_;
    close_fn_ = o.close_fn_;
    o.id_ = H5I_INVALID_HID;
  }
  return *this;
}

void Handle::reset() {
  if (id_ >= 0 && close_fn_) close_fn_(id_);
  id_ = H5I_INVALID_HID;
}

void Handle::close(const Ctx& ctx, const char* call, const std::string& obj) {
  if (id_ < 0) return;
  const hid_t id = id_;
  id_ = H5I_INVALID_HID;
  check(close_fn_(id), ctx, call, obj);
}

File File::create(const std::string& path) {
  quiet_errors();
  File f;
  f.ctx_ = {path, Blame::system};
  Handle fapl = file_access_plist(f.ctx_);
  // v1.8 object formats: compact/dense link storage, which keeps groups of thousands of tensors
  // fast; still readable by any HDF5 >= 1.8.
  check(H5Pset_libver_bounds(fapl.id(), H5F_LIBVER_V18, H5F_LIBVER_LATEST), f.ctx_,
        "H5Pset_libver_bounds");
  f.handle_ = Handle(
      check_id(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.id()), f.ctx_, "H5Fcreate"),
      H5Fclose);
  return f;
}

File File::open_read(const std::string& path) {
  quiet_errors();
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory)
    TS_USER_ERROR("cannot access HDF5 file {}: {}", path, ec.message());
  if (!fs::exists(st)) TS_USER_ERROR("HDF5 file {} does not exist", path);
  if (fs::is_directory(st)) TS_USER_ERROR("{} is a directory, not an HDF5 file", path);
  if (!fs::is_regular_file(st)) TS_USER_ERROR("{} is not a regular file", path);
  File f;
  f.ctx_ = {path, Blame::file};
  const htri_t is_h5 = H5Fis_hdf5(path.c_str());
  if (is_h5 < 0) {
    const std::string text = error_stack_text();
    H5Eclear2(H5E_DEFAULT);
    TS_USER_ERROR("cannot read HDF5 file {}: {}", path, text.empty() ? "unreadable" : text);
  }
  if (is_h5 == 0)
    TS_USER_ERROR("{} is not an HDF5 file (no HDF5 signature: another format, or truncated)", path);
  Handle fapl = file_access_plist(f.ctx_);
  f.handle_ = Handle(check_id(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.id()), f.ctx_, "H5Fopen"),
                     H5Fclose);
  return f;
}

void File::close() {
  if (!handle_.valid()) return;
  // Flush first: with the default (weak) close degree H5Fclose succeeds while objects are still
  // open and defers the write, so its return code alone would not show a failed flush.
  check(H5Fflush(handle_.id(), H5F_SCOPE_LOCAL), ctx_, "H5Fflush");
  handle_.close(ctx_, "H5Fclose");
}

Handle create_group(const Ctx& ctx, hid_t loc, const std::string& name) {
  Handle gcpl = make_plist(ctx, H5P_GROUP_CREATE, "H5Pcreate(H5P_GROUP_CREATE)");
  check(H5Pset_obj_track_times(gcpl.id(), false), ctx, "H5Pset_obj_track_times", name);
  return Handle(check_id(H5Gcreate2(loc, name.c_str(), H5P_DEFAULT, gcpl.id(), H5P_DEFAULT), ctx,
                         "H5Gcreate2", name),
                H5Gclose);
}

Handle open_group(const Ctx& ctx, hid_t loc, const std::string& name) {
  return Handle(check_id(H5Gopen2(loc, name.c_str(), H5P_DEFAULT), ctx, "H5Gopen2", name),
                H5Gclose);
}

bool link_exists(const Ctx& ctx, hid_t loc, const std::string& name) {
  return check_tri(H5Lexists(loc, name.c_str(), H5P_DEFAULT), ctx, "H5Lexists", name);
}

namespace {
herr_t collect_link(hid_t, const char* name, const H5L_info_t*, void* data) {
  static_cast<std::vector<std::string>*>(data)->push_back(name);
  return 0;
}
herr_t collect_attr(hid_t, const char* name, const H5A_info_t*, void* data) {
  static_cast<std::vector<std::string>*>(data)->push_back(name);
  return 0;
}
}  // namespace

std::vector<std::string> link_names(const Ctx& ctx, hid_t group) {
  std::vector<std::string> names;
  check(H5Literate(group, H5_INDEX_NAME, H5_ITER_INC, nullptr, collect_link, &names), ctx,
        "H5Literate");
  return names;
}

ObjectKind object_kind(const Ctx& ctx, hid_t loc, const std::string& name) {
  // A soft link whose target is missing exists as a link but not as an object.
  if (!check_tri(H5Oexists_by_name(loc, name.c_str(), H5P_DEFAULT), ctx, "H5Oexists_by_name", name))
    return ObjectKind::other;
  Handle obj(check_id(H5Oopen(loc, name.c_str(), H5P_DEFAULT), ctx, "H5Oopen", name), H5Oclose);
  const H5I_type_t t = H5Iget_type(obj.id());
  if (t == H5I_GROUP) return ObjectKind::group;
  if (t == H5I_DATASET) return ObjectKind::dataset;
  return ObjectKind::other;
}

Handle create_dataset(const Ctx& ctx, hid_t loc, const std::string& name, hid_t file_type,
                      const std::vector<int64_t>& dims, size_t elem_bytes, bool checksum) {
  Handle space = scalar_or_simple_space(ctx, dims, name);
  Handle dcpl = make_plist(ctx, H5P_DATASET_CREATE, "H5Pcreate(H5P_DATASET_CREATE)");
  // No modification times: the same tensors give byte-identical files.
  check(H5Pset_obj_track_times(dcpl.id(), false), ctx, "H5Pset_obj_track_times", name);
  int64_t numel = 1;
  for (int64_t d : dims) numel *= d;
  // Scalars and empty datasets cannot be chunked; they stay contiguous and unchecked.
  if (checksum && !dims.empty() && numel > 0) {
    std::vector<int64_t> chunk = dims;
    auto chunk_bytes = [&] {
      int64_t n = int64_t(elem_bytes);
      for (int64_t c : chunk) n *= c;
      return n;
    };
    // Halve the outermost dims first, so a chunk holds whole rows while rows fit.
    for (size_t d = 0; d < chunk.size() && chunk_bytes() > kMaxChunkBytes;) {
      if (chunk[d] > 1)
        chunk[d] = (chunk[d] + 1) / 2;
      else
        ++d;
    }
    const std::vector<hsize_t> h = to_hsize(chunk);
    check(H5Pset_chunk(dcpl.id(), int(h.size()), h.data()), ctx, "H5Pset_chunk", name);
    check(H5Pset_fletcher32(dcpl.id()), ctx, "H5Pset_fletcher32", name);
  }
  return Handle(check_id(H5Dcreate2(loc, name.c_str(), file_type, space.id(), H5P_DEFAULT,
                                    dcpl.id(), H5P_DEFAULT),
                         ctx, "H5Dcreate2", name),
                H5Dclose);
}

Handle open_dataset(const Ctx& ctx, hid_t loc, const std::string& name) {
  return Handle(check_id(H5Dopen2(loc, name.c_str(), H5P_DEFAULT), ctx, "H5Dopen2", name),
                H5Dclose);
}

std::vector<int64_t> dataset_dims(const Ctx& ctx, hid_t dset, const std::string& name) {
  Handle space(check_id(H5Dget_space(dset), ctx, "H5Dget_space", name), H5Sclose);
  const int rank = H5Sget_simple_extent_ndims(space.id());
  if (rank < 0) fail(ctx, "H5Sget_simple_extent_ndims", name);
  std::vector<hsize_t> h(size_t(rank), 0);
  if (rank > 0 && H5Sget_simple_extent_dims(space.id(), h.data(), nullptr) < 0)
    fail(ctx, "H5Sget_simple_extent_dims", name);
  return std::vector<int64_t>(h.begin(), h.end());
}

void write_dataset(const Ctx& ctx, hid_t dset, hid_t mem_type, const void* data,
                   const std::string& name) {
  check(H5Dwrite(dset, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), ctx, "H5Dwrite", name);
}

void read_box(const Ctx& ctx, hid_t dset, hid_t mem_type, const std::vector<int64_t>& file_offset,
              const std::vector<int64_t>& count, void* mem, const std::vector<int64_t>& mem_dims,
              const std::vector<int64_t>& mem_offset, const std::string& name) {
  TS_CHECK(file_offset.size() == count.size() && mem_dims.size() == count.size() &&
               mem_offset.size() == count.size(),
           "read_box rank mismatch for {}", name);
  if (count.empty()) {  // scalar
    check(H5Dread(dset, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, mem), ctx, "H5Dread", name);
    return;
  }
  for (int64_t c : count)
    if (c == 0) return;
  Handle fspace(check_id(H5Dget_space(dset), ctx, "H5Dget_space", name), H5Sclose);
  const std::vector<hsize_t> fstart = to_hsize(file_offset), hcount = to_hsize(count);
  check(H5Sselect_hyperslab(fspace.id(), H5S_SELECT_SET, fstart.data(), nullptr, hcount.data(),
                            nullptr),
        ctx, "H5Sselect_hyperslab", name);
  Handle mspace = scalar_or_simple_space(ctx, mem_dims, name);
  const std::vector<hsize_t> mstart = to_hsize(mem_offset);
  check(H5Sselect_hyperslab(mspace.id(), H5S_SELECT_SET, mstart.data(), nullptr, hcount.data(),
                            nullptr),
        ctx, "H5Sselect_hyperslab", name);
  check(H5Dread(dset, mem_type, mspace.id(), fspace.id(), H5P_DEFAULT, mem), ctx, "H5Dread", name);
}

void write_string_dataset(const Ctx& ctx, hid_t loc, const std::string& name,
                          const std::string& value) {
  TS_CHECK(value.find('\0') == std::string::npos, "string value for {} contains a NUL byte", name);
  // Size 0 is not a valid string type: an empty value is stored as one NUL of padding.
  const std::string padded = value.empty() ? std::string(1, '\0') : value;
  Handle type = fixed_string_type(ctx, padded.size(), name);
  Handle space = scalar_or_simple_space(ctx, {}, name);
  Handle dcpl = make_plist(ctx, H5P_DATASET_CREATE, "H5Pcreate(H5P_DATASET_CREATE)");
  check(H5Pset_obj_track_times(dcpl.id(), false), ctx, "H5Pset_obj_track_times", name);
  Handle dset(check_id(H5Dcreate2(loc, name.c_str(), type.id(), space.id(), H5P_DEFAULT, dcpl.id(),
                                  H5P_DEFAULT),
                       ctx, "H5Dcreate2", name),
              H5Dclose);
  check(H5Dwrite(dset.id(), type.id(), H5S_ALL, H5S_ALL, H5P_DEFAULT, padded.data()), ctx,
        "H5Dwrite", name);
  dset.close(ctx, "H5Dclose", name);
}

std::string read_string_dataset(const Ctx& ctx, hid_t loc, const std::string& name) {
  Handle dset = open_dataset(ctx, loc, name);
  Handle type(check_id(H5Dget_type(dset.id()), ctx, "H5Dget_type", name), H5Tclose);
  Handle space(check_id(H5Dget_space(dset.id()), ctx, "H5Dget_space", name), H5Sclose);
  const hssize_t n = H5Sget_simple_extent_npoints(space.id());
  if (n < 0) fail(ctx, "H5Sget_simple_extent_npoints", name);
  return read_fixed_string(ctx, type.id(), n, name, [&](hid_t mem, void* buf) {
    return H5Dread(dset.id(), mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf);
  });
}

bool attr_exists(const Ctx& ctx, hid_t obj, const std::string& name) {
  return check_tri(H5Aexists(obj, name.c_str()), ctx, "H5Aexists", name);
}

std::vector<std::string> attr_names(const Ctx& ctx, hid_t obj) {
  std::vector<std::string> names;
  check(H5Aiterate2(obj, H5_INDEX_NAME, H5_ITER_INC, nullptr, collect_attr, &names), ctx,
        "H5Aiterate2");
  return names;
}

void write_attr_i64s(const Ctx& ctx, hid_t obj, const std::string& name,
                     const std::vector<int64_t>& values) {
  // An empty array (the shape of a scalar) gets a null dataspace: zero-sized simple dataspaces
  // are not portable for attributes.
  Handle space = values.empty()
                     ? Handle(check_id(H5Screate(H5S_NULL), ctx, "H5Screate", name), H5Sclose)
                     : scalar_or_simple_space(ctx, {int64_t(values.size())}, name);
  Handle attr(
      check_id(H5Acreate2(obj, name.c_str(), H5T_STD_I64LE, space.id(), H5P_DEFAULT, H5P_DEFAULT),
               ctx, "H5Acreate2", name),
      H5Aclose);
  if (!values.empty())
    check(H5Awrite(attr.id(), H5T_NATIVE_INT64, values.data()), ctx, "H5Awrite", name);
  attr.close(ctx, "H5Aclose", name);
}

std::vector<int64_t> read_attr_i64s(const Ctx& ctx, hid_t obj, const std::string& name) {
  Handle attr(check_id(H5Aopen(obj, name.c_str(), H5P_DEFAULT), ctx, "H5Aopen", name), H5Aclose);
  Handle type(check_id(H5Aget_type(attr.id()), ctx, "H5Aget_type", name), H5Tclose);
  if (H5Tget_class(type.id()) != H5T_INTEGER)
    TS_USER_ERROR("{}: attribute must hold integers, found {}", where(ctx, name),
                  type_text(type.id()));
  Handle space(check_id(H5Aget_space(attr.id()), ctx, "H5Aget_space", name), H5Sclose);
  const hssize_t n = H5Sget_simple_extent_npoints(space.id());
  if (n < 0) fail(ctx, "H5Sget_simple_extent_npoints", name);
  std::vector<int64_t> values(size_t(n), 0);
  if (n > 0) check(H5Aread(attr.id(), H5T_NATIVE_INT64, values.data()), ctx, "H5Aread", name);
  return values;
}

void write_attr_string(const Ctx& ctx, hid_t obj, const std::string& name,
                       const std::string& value) {
  TS_CHECK(value.find('\0') == std::string::npos, "attribute {} contains a NUL byte", name);
  const std::string padded = value.empty() ? std::string(1, '\0') : value;
  Handle type = fixed_string_type(ctx, padded.size(), name);
  Handle space = scalar_or_simple_space(ctx, {}, name);
  Handle attr(
      check_id(H5Acreate2(obj, name.c_str(), type.id(), space.id(), H5P_DEFAULT, H5P_DEFAULT), ctx,
               "H5Acreate2", name),
      H5Aclose);
  check(H5Awrite(attr.id(), type.id(), padded.data()), ctx, "H5Awrite", name);
  attr.close(ctx, "H5Aclose", name);
}

std::string read_attr_string(const Ctx& ctx, hid_t obj, const std::string& name) {
  Handle attr(check_id(H5Aopen(obj, name.c_str(), H5P_DEFAULT), ctx, "H5Aopen", name), H5Aclose);
  Handle type(check_id(H5Aget_type(attr.id()), ctx, "H5Aget_type", name), H5Tclose);
  Handle space(check_id(H5Aget_space(attr.id()), ctx, "H5Aget_space", name), H5Sclose);
  const hssize_t n = H5Sget_simple_extent_npoints(space.id());
  if (n < 0) fail(ctx, "H5Sget_simple_extent_npoints", name);
  return read_fixed_string(ctx, type.id(), n, name,
                           [&](hid_t mem, void* buf) { return H5Aread(attr.id(), mem, buf); });
}

std::string type_text(hid_t type) {
  const size_t size = H5Tget_size(type);
  switch (H5Tget_class(type)) {
    case H5T_INTEGER:
      return fmt::format("{}{}", H5Tget_sign(type) == H5T_SGN_NONE ? "u" : "i", size * 8);
    case H5T_FLOAT: return fmt::format("f{}", size * 8);
    case H5T_STRING:
      return H5Tis_variable_str(type) > 0 ? std::string("vlen string")
                                          : fmt::format("string[{}]", size);
    case H5T_COMPOUND: return fmt::format("compound[{} B]", size);
    case H5T_ENUM: return fmt::format("enum[{} B]", size);
    case H5T_ARRAY: return "array";
    case H5T_VLEN: return "vlen";
    case H5T_OPAQUE: return fmt::format("opaque[{} B]", size);
    case H5T_REFERENCE: return "reference";
    case H5T_BITFIELD: return fmt::format("bitfield[{} B]", size);
    default: return "unknown type";
  }
}

std::string dataset_type_text(const Ctx& ctx, hid_t dset, const std::string& name) {
  Handle type(check_id(H5Dget_type(dset), ctx, "H5Dget_type", name), H5Tclose);
  return type_text(type.id());
}

std::string attr_value_text(const Ctx& ctx, hid_t obj, const std::string& name, size_t max_chars) {
  // Numeric attributes longer than this are summarised by their length only.
  constexpr hssize_t kMaxShownValues = 16;
  Handle attr(check_id(H5Aopen(obj, name.c_str(), H5P_DEFAULT), ctx, "H5Aopen", name), H5Aclose);
  Handle type(check_id(H5Aget_type(attr.id()), ctx, "H5Aget_type", name), H5Tclose);
  Handle space(check_id(H5Aget_space(attr.id()), ctx, "H5Aget_space", name), H5Sclose);
  const hssize_t n = H5Sget_simple_extent_npoints(space.id());
  if (n < 0) fail(ctx, "H5Sget_simple_extent_npoints", name);
  const H5S_class_t space_class = H5Sget_simple_extent_type(space.id());
  std::string text;
  const H5T_class_t cls = H5Tget_class(type.id());
  auto join = [&](const auto& values) {
    std::string s;
    for (size_t i = 0; i < values.size(); ++i) s += fmt::format("{}{}", i ? ", " : "", values[i]);
    return space_class == H5S_SCALAR ? s : "[" + s + "]";
  };
  if (n == 0) {
    text = "[]";
  } else if ((cls == H5T_INTEGER || cls == H5T_FLOAT) && n > kMaxShownValues) {
    text = fmt::format("<{} {} values>", n, type_text(type.id()));
  } else if (cls == H5T_INTEGER && H5Tget_sign(type.id()) == H5T_SGN_NONE) {
    std::vector<uint64_t> v(static_cast<size_t>(n));
    check(H5Aread(attr.id(), H5T_NATIVE_UINT64, v.data()), ctx, "H5Aread", name);
    text = join(v);
  } else if (cls == H5T_INTEGER) {
    std::vector<int64_t> v(static_cast<size_t>(n));
    check(H5Aread(attr.id(), H5T_NATIVE_INT64, v.data()), ctx, "H5Aread", name);
    text = join(v);
  } else if (cls == H5T_FLOAT) {
    std::vector<double> v(static_cast<size_t>(n));
    check(H5Aread(attr.id(), H5T_NATIVE_DOUBLE, v.data()), ctx, "H5Aread", name);
    text = join(v);
  } else if (cls == H5T_STRING && n == 1) {
    if (check_tri(H5Tis_variable_str(type.id()), ctx, "H5Tis_variable_str", name)) {
      Handle mem(check_id(H5Tcopy(H5T_C_S1), ctx, "H5Tcopy", name), H5Tclose);
      check(H5Tset_size(mem.id(), H5T_VARIABLE), ctx, "H5Tset_size", name);
      // HDF5 converts between string types only within one character set (ASCII vs UTF-8).
      check(H5Tset_cset(mem.id(), H5Tget_cset(type.id())), ctx, "H5Tset_cset", name);
      char* value = nullptr;
      check(H5Aread(attr.id(), mem.id(), &value), ctx, "H5Aread", name);
      text = value ? value : "";
      check(H5Dvlen_reclaim(mem.id(), space.id(), H5P_DEFAULT, &value), ctx, "H5Dvlen_reclaim",
            name);
    } else {
      const size_t size = H5Tget_size(type.id());
      Handle mem = fixed_string_type(ctx, size, name);
      std::string buf(size, '\0');
      check(H5Aread(attr.id(), mem.id(), buf.data()), ctx, "H5Aread", name);
      text = strip_nul_padding(std::move(buf));
    }
  } else {
    text = fmt::format("<{} x {}>", n, type_text(type.id()));
  }
  if (text.size() > max_chars) text = text.substr(0, max_chars) + "...";
  return text;
}

}  // namespace tessera::io::h5

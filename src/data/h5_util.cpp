// HDF5 C API wrappers with checked return codes and blame-aware errors (see h5_util.h).
#include "data/h5_util.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace tessera::h5 {

namespace {

// The innermost message on HDF5's current error stack (the most specific cause, e.g. "truncated
// file: eof = ..."), and clears the stack.
std::string innermost_error() {
  const hid_t stack = H5Eget_current_stack();
  if (stack < 0) return {};
  std::string msg;
  const auto visit = [](unsigned n, const H5E_error2_t* err, void* out) -> herr_t {
    if (n == 0 && err && err->desc) *static_cast<std::string*>(out) = err->desc;
    return 0;
  };
  H5Ewalk2(stack, H5E_WALK_UPWARD, visit, &msg);
  H5Eclose_stack(stack);
  return msg;
}

template <class T>
T check(const Context& ctx, T ret, std::string_view what) {
  if (ret < 0) fail(ctx, what);
  return ret;
}

Handle own(const Context& ctx, hid_t id, herr_t (*close_fn)(hid_t), std::string_view what) {
  if (id < 0) fail(ctx, what);
  return Handle(id, close_fn);
}

Handle vlen_string_type(const Context& ctx) {
  Handle t = own(ctx, H5Tcopy(H5T_C_S1), H5Tclose, "H5Tcopy(C_S1)");
  check(ctx, H5Tset_size(t.get(), H5T_VARIABLE), "H5Tset_size(variable)");
  check(ctx, H5Tset_cset(t.get(), H5T_CSET_UTF8), "H5Tset_cset(UTF-8)");
  return t;
}

Handle open_attr(const Context& ctx, const Handle& obj, const std::string& name) {
  if (!has_attr(ctx, obj, name)) fail(ctx, "missing attribute '" + name + "'");
  return own(ctx, H5Aopen(obj.get(), name.c_str(), H5P_DEFAULT), H5Aclose,
             "cannot open attribute '" + name + "'");
}

int64_t attr_num_points(const Context& ctx, const Handle& attr, const std::string& name) {
  Handle space = own(ctx, H5Aget_space(attr.get()), H5Sclose, "H5Aget_space(" + name + ")");
  return check(ctx, static_cast<int64_t>(H5Sget_simple_extent_npoints(space.get())),
               "H5Sget_simple_extent_npoints(" + name + ")");
}

H5T_class_t attr_class(const Context& ctx, const Handle& attr, const std::string& name) {
  Handle type = own(ctx, H5Aget_type(attr.get()), H5Tclose, "H5Aget_type(" + name + ")");
  const H5T_class_t cls = H5Tget_class(type.get());
  if (cls == H5T_NO_CLASS) fail(ctx, "H5Tget_class(" + name + ")");
  return cls;
}

void write_attr(const Context& ctx, const Handle& obj, const std::string& name, hid_t file_type,
                hid_t mem_type, const Handle& space, const void* data) {
  // Replace rather than fail when the attribute exists (a writer may be rewriting metadata).
  if (has_attr(ctx, obj, name)) {
    check(ctx, H5Adelete(obj.get(), name.c_str()), "H5Adelete(" + name + ")");
  }
  Handle attr = own(
      ctx, H5Acreate2(obj.get(), name.c_str(), file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT),
      H5Aclose, "cannot create attribute '" + name + "'");
  check(ctx, H5Awrite(attr.get(), mem_type, data), "cannot write attribute '" + name + "'");
  attr.close(ctx, "H5Aclose(" + name + ")");
}

}  // namespace

void silence_library_errors() {
  // Per thread in thread-safe HDF5 builds, global otherwise; cheap, so callers repeat it.
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
}

void fail(const Context& ctx, std::string_view what) {
  const std::string detail = innermost_error();
  const std::string text =
      fmt::format("{}: {}{}{}", ctx.file, what, detail.empty() ? "" : ": ", detail);
  if (ctx.blame == Blame::user_file) {
    // With an HDF5 message the library itself failed on the file's bytes, not on our checks.
    TS_USER_ERROR("{}{}", text, detail.empty() ? "" : " (is the file truncated or corrupt?)");
  }
  TS_SYSTEM_ERROR("HDF5: {}", text);
}

Handle& Handle::operator=(Handle&& o) noexcept {
  if (this != &o) {
    if (id_ >= 0 && close_fn_) close_fn_(id_);
    id_ = o.id_;
    close_fn_ = o.close_fn_;
    o.id_ = H5I_INVALID_HID;
  }
  return *this;
}

Handle::~Handle() {
  if (id_ >= 0 && close_fn_) close_fn_(id_);
}

void Handle::close(const Context& ctx, std::string_view what) {
  if (id_ < 0) return;
  const herr_t ret = close_fn_(id_);
  id_ = H5I_INVALID_HID;
  if (ret < 0) fail(ctx, what);
}

Handle create_file(const Context& ctx) {
  silence_library_errors();
  Handle fcpl = own(ctx, H5Pcreate(H5P_FILE_CREATE), H5Pclose, "H5Pcreate(file create)");
  // The root group keeps no modification time either (see create_group).
  check(ctx, H5Pset_obj_track_times(fcpl.get(), false), "H5Pset_obj_track_times");
  return own(ctx, H5Fcreate(ctx.file.c_str(), H5F_ACC_TRUNC, fcpl.get(), H5P_DEFAULT), H5Fclose,
             "cannot create HDF5 file");
}

Handle open_file_read(const Context& ctx) {
  silence_library_errors();
  struct stat st {};
  if (::stat(ctx.file.c_str(), &st) != 0) {
    TS_USER_ERROR("{}: cannot open: {}", ctx.file, std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) TS_USER_ERROR("{}: not a regular file", ctx.file);
  const Context user{ctx.file, Blame::user_file};
  const htri_t is_hdf5 = H5Fis_hdf5(ctx.file.c_str());
  if (is_hdf5 < 0) fail(user, "cannot read the file to check for an HDF5 signature");
  if (is_hdf5 == 0) {
    TS_USER_ERROR("{}: not an HDF5 file (no HDF5 signature found; {} bytes)", ctx.file,
                  static_cast<int64_t>(st.st_size));
  }
  return own(user, H5Fopen(ctx.file.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose,
             "HDF5 cannot open the file");
}

void flush_file(const Context& ctx, const Handle& file) {
  check(ctx, H5Fflush(file.get(), H5F_SCOPE_GLOBAL), "H5Fflush");
}

Handle create_group(const Context& ctx, const Handle& loc, const std::string& name) {
  Handle gcpl = own(ctx, H5Pcreate(H5P_GROUP_CREATE), H5Pclose, "H5Pcreate(group create)");
  // No modification times: the same inputs then give a byte-identical file.
  check(ctx, H5Pset_obj_track_times(gcpl.get(), false), "H5Pset_obj_track_times");
  return own(ctx, H5Gcreate2(loc.get(), name.c_str(), H5P_DEFAULT, gcpl.get(), H5P_DEFAULT),
             H5Gclose, "cannot create group '" + name + "'");
}

bool has_link(const Context& ctx, const Handle& loc, const std::string& name) {
  return check(ctx, H5Lexists(loc.get(), name.c_str(), H5P_DEFAULT), "H5Lexists('" + name + "')") >
         0;
}

Handle open_group(const Context& ctx, const Handle& loc, const std::string& name) {
  if (!has_link(ctx, loc, name)) fail(ctx, "missing group '" + name + "'");
  return own(ctx, H5Gopen2(loc.get(), name.c_str(), H5P_DEFAULT), H5Gclose,
             "'" + name + "' is not a readable group");
}

Handle open_dataset(const Context& ctx, const Handle& loc, const std::string& name) {
  if (!has_link(ctx, loc, name)) fail(ctx, "missing dataset '" + name + "'");
  return own(ctx, H5Dopen2(loc.get(), name.c_str(), H5P_DEFAULT), H5Dclose,
             "'" + name + "' is not a readable dataset");
}

void write_1d(const Context& ctx, const Handle& loc, const std::string& name, hid_t file_type,
              hid_t mem_type, const void* data, int64_t n, int64_t chunk) {
  TS_CHECK(n >= 0 && chunk > 0, "write_1d({}): n={} chunk={}", name, n, chunk);
  const hsize_t dims[1] = {static_cast<hsize_t>(n)};
  Handle space = own(ctx, H5Screate_simple(1, dims, dims), H5Sclose, "H5Screate_simple");
  Handle dcpl = own(ctx, H5Pcreate(H5P_DATASET_CREATE), H5Pclose, "H5Pcreate(dataset create)");
  const hsize_t chunk_dims[1] = {static_cast<hsize_t>(std::max<int64_t>(1, std::min(n, chunk)))};
  check(ctx, H5Pset_chunk(dcpl.get(), 1, chunk_dims), "H5Pset_chunk");
  check(ctx, H5Pset_obj_track_times(dcpl.get(), false), "H5Pset_obj_track_times");
  if (check(ctx, H5Zfilter_avail(H5Z_FILTER_DEFLATE), "H5Zfilter_avail(deflate)") > 0) {
    check(ctx, H5Pset_shuffle(dcpl.get()), "H5Pset_shuffle");
    check(ctx, H5Pset_deflate(dcpl.get(), 1), "H5Pset_deflate");
  }
  // Last in the pipeline, so it checksums the stored bytes: a corrupted chunk fails its read.
  check(ctx, H5Pset_fletcher32(dcpl.get()), "H5Pset_fletcher32");
  Handle dset = own(ctx,
                    H5Dcreate2(loc.get(), name.c_str(), file_type, space.get(), H5P_DEFAULT,
                               dcpl.get(), H5P_DEFAULT),
                    H5Dclose, "cannot create dataset '" + name + "'");
  if (n > 0) {
    check(ctx, H5Dwrite(dset.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data),
          "cannot write dataset '" + name + "'");
  }
  dset.close(ctx, "H5Dclose(" + name + ")");
}

IntegerInfo integer_1d_info(const Context& ctx, const Handle& dset, const std::string& name) {
  Handle type = own(ctx, H5Dget_type(dset.get()), H5Tclose, "H5Dget_type(" + name + ")");
  const H5T_class_t cls = H5Tget_class(type.get());
  if (cls == H5T_NO_CLASS) fail(ctx, "H5Tget_class(" + name + ")");
  if (cls != H5T_INTEGER) fail(ctx, "dataset '" + name + "' is not an integer dataset");
  IntegerInfo info;
  info.size_bytes = H5Tget_size(type.get());
  if (info.size_bytes == 0) fail(ctx, "H5Tget_size(" + name + ")");
  const H5T_sign_t sign = H5Tget_sign(type.get());
  if (sign == H5T_SGN_ERROR) fail(ctx, "H5Tget_sign(" + name + ")");
  info.is_signed = sign != H5T_SGN_NONE;
  Handle space = own(ctx, H5Dget_space(dset.get()), H5Sclose, "H5Dget_space(" + name + ")");
  const int rank = check(ctx, H5Sget_simple_extent_ndims(space.get()), "H5Sget_extent_ndims");
  if (rank != 1) {
    fail(ctx, fmt::format("dataset '{}' has rank {}, expected a 1-D dataset", name, rank));
  }
  hsize_t dims[1] = {0};
  check(ctx, H5Sget_simple_extent_dims(space.get(), dims, nullptr), "H5Sget_simple_extent_dims");
  info.length = static_cast<int64_t>(dims[0]);
  return info;
}

std::vector<uint32_t> read_1d_u32(const Context& ctx, const Handle& dset, const std::string& name) {
  const IntegerInfo info = integer_1d_info(ctx, dset, name);
  std::vector<uint32_t> out(static_cast<size_t>(info.length));
  if (!out.empty()) {
    check(ctx, H5Dread(dset.get(), H5T_NATIVE_UINT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()),
          "cannot read dataset '" + name + "'");
  }
  return out;
}

std::vector<int64_t> read_1d_i64(const Context& ctx, const Handle& dset, const std::string& name) {
  const IntegerInfo info = integer_1d_info(ctx, dset, name);
  std::vector<int64_t> out(static_cast<size_t>(info.length));
  if (!out.empty()) {
    check(ctx, H5Dread(dset.get(), H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()),
          "cannot read dataset '" + name + "'");
  }
  return out;
}

bool has_attr(const Context& ctx, const Handle& obj, const std::string& name) {
  return check(ctx, H5Aexists(obj.get(), name.c_str()), "H5Aexists('" + name + "')") > 0;
}

void write_attr_string(const Context& ctx, const Handle& obj, const std::string& name,
                       const std::string& value) {
  // Variable-length strings end at the first NUL; a silent truncation would corrupt metadata.
  TS_CHECK(value.find('\0') == std::string::npos, "attribute '{}' holds a NUL byte", name);
  Handle type = vlen_string_type(ctx);
  Handle space = own(ctx, H5Screate(H5S_SCALAR), H5Sclose, "H5Screate(scalar)");
  const char* ptr = value.c_str();
  write_attr(ctx, obj, name, type.get(), type.get(), space, &ptr);
}

void write_attr_strings(const Context& ctx, const Handle& obj, const std::string& name,
                        const std::vector<std::string>& values) {
  std::vector<const char*> ptrs;
  for (const auto& v : values) {
    TS_CHECK(v.find('\0') == std::string::npos, "attribute '{}' holds a NUL byte", name);
    ptrs.push_back(v.c_str());
  }
  Handle type = vlen_string_type(ctx);
  const hsize_t dims[1] = {values.size()};
  Handle space = own(ctx, H5Screate_simple(1, dims, nullptr), H5Sclose, "H5Screate_simple");
  // HDF5 refuses a null buffer even for zero elements.
  const char* none = nullptr;
  write_attr(ctx, obj, name, type.get(), type.get(), space, ptrs.empty() ? &none : ptrs.data());
}

void write_attr_int64(const Context& ctx, const Handle& obj, const std::string& name, int64_t v) {
  Handle space = own(ctx, H5Screate(H5S_SCALAR), H5Sclose, "H5Screate(scalar)");
  write_attr(ctx, obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, space, &v);
}

void write_attr_double(const Context& ctx, const Handle& obj, const std::string& name, double v) {
  Handle space = own(ctx, H5Screate(H5S_SCALAR), H5Sclose, "H5Screate(scalar)");
  write_attr(ctx, obj, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, space, &v);
}

std::vector<std::string> read_attr_strings(const Context& ctx, const Handle& obj,
                                           const std::string& name) {
  Handle attr = open_attr(ctx, obj, name);
  if (attr_class(ctx, attr, name) != H5T_STRING) {
    fail(ctx, "attribute '" + name + "' is not a string");
  }
  const int64_t n = attr_num_points(ctx, attr, name);
  if (n == 0) return {};
  Handle ftype = own(ctx, H5Aget_type(attr.get()), H5Tclose, "H5Aget_type(" + name + ")");
  const htri_t is_vlen = check(ctx, H5Tis_variable_str(ftype.get()), "H5Tis_variable_str");
  std::vector<std::string> out;
  out.reserve(static_cast<size_t>(n));
  if (is_vlen > 0) {
    Handle mtype = vlen_string_type(ctx);
    std::vector<char*> ptrs(static_cast<size_t>(n), nullptr);
    check(ctx, H5Aread(attr.get(), mtype.get(), ptrs.data()),
          "cannot read attribute '" + name + "'");
    for (char* p : ptrs) out.emplace_back(p ? p : "");
    Handle space = own(ctx, H5Aget_space(attr.get()), H5Sclose, "H5Aget_space");
    check(ctx, H5Dvlen_reclaim(mtype.get(), space.get(), H5P_DEFAULT, ptrs.data()),
          "H5Dvlen_reclaim");
  } else {
    const size_t size = H5Tget_size(ftype.get());
    if (size == 0) fail(ctx, "H5Tget_size(" + name + ")");
    Handle mtype = own(ctx, H5Tcopy(H5T_C_S1), H5Tclose, "H5Tcopy(C_S1)");
    check(ctx, H5Tset_size(mtype.get(), size), "H5Tset_size");
    std::string buf(size * static_cast<size_t>(n), '\0');
    check(ctx, H5Aread(attr.get(), mtype.get(), buf.data()),
          "cannot read attribute '" + name + "'");
    for (int64_t i = 0; i < n; ++i) {
      std::string s = buf.substr(static_cast<size_t>(i) * size, size);
      s.resize(std::min(s.size(), s.find('\0')));  // null-terminated or null-padded storage
      out.push_back(std::move(s));
    }
  }
  return out;
}

std::string read_attr_string(const Context& ctx, const Handle& obj, const std::string& name) {
  std::vector<std::string> v = read_attr_strings(ctx, obj, name);
  if (v.size() != 1) {
    fail(ctx, fmt::format("attribute '{}' holds {} strings, expected one", name, v.size()));
  }
  return std::move(v[0]);
}

int64_t read_attr_int64(const Context& ctx, const Handle& obj, const std::string& name) {
  Handle attr = open_attr(ctx, obj, name);
  if (attr_class(ctx, attr, name) != H5T_INTEGER) {
    fail(ctx, "attribute '" + name + "' is not an integer");
  }
  if (attr_num_points(ctx, attr, name) != 1) fail(ctx, "attribute '" + name + "' is not a scalar");
  int64_t v = 0;
  check(ctx, H5Aread(attr.get(), H5T_NATIVE_INT64, &v), "cannot read attribute '" + name + "'");
  return v;
}

double read_attr_double(const Context& ctx, const Handle& obj, const std::string& name) {
  Handle attr = open_attr(ctx, obj, name);
  const H5T_class_t cls = attr_class(ctx, attr, name);
  if (cls != H5T_FLOAT && cls != H5T_INTEGER) fail(ctx, "attribute '" + name + "' is not a number");
  if (attr_num_points(ctx, attr, name) != 1) fail(ctx, "attribute '" + name + "' is not a scalar");
  double v = 0;
  check(ctx, H5Aread(attr.get(), H5T_NATIVE_DOUBLE, &v), "cannot read attribute '" + name + "'");
  return v;
}

}  // namespace tessera::h5

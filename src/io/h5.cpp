// Checked HDF5 wrappers (see h5.h). Each HDF5 call's result goes through check/check_id/check_tri,
// which read the HDF5 error stack before anything else can clear it.
#include "io/h5.h"

#include <algorithm>
#include <filesystem>
#include <functional>
#include <system_error>
#include <type_traits>

#include "core/error.h"

namespace tessera::io::h5 {

namespace {

// Chunks of checksummed datasets hold at most this many bytes: small enough that reading a
// sub-box touches little extra data, large enough that per-chunk overhead is negligible.
constexpr int64_t kMaxChunkBytes = int64_t(4) << 20;
// Hash slots of a dataset's chunk cache when its size is set: a prime well above the number of
// chunks such caches hold, as HDF5's documentation advises (few collisions).
constexpr size_t kChunkCacheSlots = 12421;

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
  // to open any file; writers never share a file, so locking is only a safety net.
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

// A dataset creation property list that records no modification time (reproducible files).
Handle untimed_dcpl(const Ctx& ctx, const std::string& obj) {
  Handle dcpl = make_plist(ctx, H5P_DATASET_CREATE, "H5Pcreate(H5P_DATASET_CREATE)");
  check(H5Pset_obj_track_times(dcpl.id(), false), ctx, "H5Pset_obj_track_times", obj);
  return dcpl;
}

// A UTF-8 string type: fixed-length NUL-padded of `size` bytes (size >= 1), or variable-length.
Handle string_type(const Ctx& ctx, StrType kind, size_t size, const std::string& obj) {
  Handle t(check_id(H5Tcopy(H5T_C_S1), ctx, "H5Tcopy", obj), H5Tclose);
  check(H5Tset_size(t.id(), kind == StrType::vlen ? H5T_VARIABLE : size), ctx, "H5Tset_size", obj);
  if (kind == StrType::fixed)
    check(H5Tset_strpad(t.id(), H5T_STR_NULLPAD), ctx, "H5Tset_strpad", obj);
  check(H5Tset_cset(t.id(), H5T_CSET_UTF8), ctx, "H5Tset_cset", obj);
  return t;
}

// Reads the `n` strings of a dataset or attribute whose stored type is `type` (fixed- or
// variable-length) through `read(mem_type, buffer)`.
std::vector<std::string> read_strings(const Ctx& ctx, hid_t type, hid_t space, int64_t n,
                                      const std::string& obj,
                                      const std::function<herr_t(hid_t, void*)>& read) {
  if (H5Tget_class(type) != H5T_STRING)
    fail_content(ctx, fmt::format("'{}' must hold strings, found {}", obj, type_text(type)));
  // HDF5 converts between string types only within one character set (ASCII vs UTF-8).
  const H5T_cset_t cset = H5Tget_cset(type);
  std::vector<std::string> out;
  if (check_tri(H5Tis_variable_str(type), ctx, "H5Tis_variable_str", obj)) {
    Handle mem = string_type(ctx, StrType::vlen, 0, obj);
    check(H5Tset_cset(mem.id(), cset), ctx, "H5Tset_cset", obj);
    std::vector<char*> ptrs(size_t(n), nullptr);
    check(read(mem.id(), ptrs.data()), ctx, "H5Dread/H5Aread", obj);
    for (char* p : ptrs) out.emplace_back(p ? p : "");
    check(H5Dvlen_reclaim(mem.id(), space, H5P_DEFAULT, ptrs.data()), ctx, "H5Dvlen_reclaim", obj);
    return out;
  }
  const size_t size = H5Tget_size(type);
  if (size == 0) fail(ctx, "H5Tget_size", obj);
  Handle mem = string_type(ctx, StrType::fixed, size, obj);
  check(H5Tset_cset(mem.id(), cset), ctx, "H5Tset_cset", obj);
  std::string buf(size * size_t(n), '\0');
  check(read(mem.id(), buf.data()), ctx, "H5Dread/H5Aread", obj);
  for (int64_t i = 0; i < n; ++i) {
    std::string s = buf.substr(size_t(i) * size, size);
    s.resize(std::min(s.size(), s.find('\0')));  // NUL-padded or NUL-terminated storage
    out.push_back(std::move(s));
  }
  return out;
}

int64_t num_points(const Ctx& ctx, hid_t space, const std::string& obj) {
  const hssize_t n = H5Sget_simple_extent_npoints(space);
  if (n < 0) fail(ctx, "H5Sget_simple_extent_npoints", obj);
  return int64_t(n);
}

// An open attribute with its type and dataspace; a missing one is reported by name.
struct Attr {
  Handle attr, type, space;
  int64_t n = 0;
};

Attr open_attr(const Ctx& ctx, hid_t obj, const std::string& name) {
  if (!attr_exists(ctx, obj, name)) fail_content(ctx, fmt::format("missing attribute '{}'", name));
  Attr a;
  a.attr =
      Handle(check_id(H5Aopen(obj, name.c_str(), H5P_DEFAULT), ctx, "H5Aopen", name), H5Aclose);
  a.type = Handle(check_id(H5Aget_type(a.attr.id()), ctx, "H5Aget_type", name), H5Tclose);
  a.space = Handle(check_id(H5Aget_space(a.attr.id()), ctx, "H5Aget_space", name), H5Sclose);
  a.n = num_points(ctx, a.space.id(), name);
  return a;
}

// Reads a one-value numeric attribute of class `cls` (or integer where a float is asked for).
template <class T>
T read_attr_number(const Ctx& ctx, hid_t obj, const std::string& name, hid_t mem_type) {
  const Attr a = open_attr(ctx, obj, name);
  const H5T_class_t cls = H5Tget_class(a.type.id());
  const bool want_float = std::is_floating_point_v<T>;
  if (cls != H5T_INTEGER && !(want_float && cls == H5T_FLOAT))
    fail_content(ctx, fmt::format("attribute '{}' must hold {}, found {}", name,
                                  want_float ? "a number" : "an integer", type_text(a.type.id())));
  if (a.n != 1)
    fail_content(ctx, fmt::format("attribute '{}' holds {} values, expected one", name, a.n));
  T v{};
  check(H5Aread(a.attr.id(), mem_type, &v), ctx, "H5Aread", name);
  return v;
}

// Creates attribute `name` (replacing one of that name) and writes `data` to it.
void write_attr(const Ctx& ctx, hid_t obj, const std::string& name, hid_t file_type, hid_t mem_type,
                hid_t space, const void* data) {
  if (attr_exists(ctx, obj, name)) check(H5Adelete(obj, name.c_str()), ctx, "H5Adelete", name);
  Handle attr(check_id(H5Acreate2(obj, name.c_str(), file_type, space, H5P_DEFAULT, H5P_DEFAULT),
                       ctx, "H5Acreate2", name),
              H5Aclose);
  if (data) check(H5Awrite(attr.id(), mem_type, data), ctx, "H5Awrite", name);
  attr.close(ctx, "H5Aclose", name);
}

void check_no_nul(const std::string& value, const std::string& name) {
  TS_CHECK(value.find('\0') == std::string::npos, "string value for {} contains a NUL byte", name);
}

herr_t collect_name(const char* name, void* data) {
  static_cast<std::vector<std::string>*>(data)->push_back(name);
  return 0;
}
herr_t collect_link(hid_t, const char* name, const H5L_info_t*, void* data) {
  return collect_name(name, data);
}
herr_t collect_attr(hid_t, const char* name, const H5A_info_t*, void* data) {
  return collect_name(name, data);
}

}  // namespace

// --- errors
// ---------------------------------------------------------------------------------------

void quiet_errors() {
  // Per thread in thread-safe HDF5 builds (global otherwise), so each thread switches it off once.
  thread_local bool quiet = false;
  if (quiet) return;
  if (H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr) < 0)
    TS_SYSTEM_ERROR("H5Eset_auto2: cannot silence the HDF5 error printer");
  quiet = true;
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

void fail_content(const Ctx& ctx, const std::string& problem) {
  if (ctx.blame == Blame::file) TS_USER_ERROR("{}: {}", ctx.path, problem);
  TS_SYSTEM_ERROR("HDF5 file {}: {}", ctx.path, problem);
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

// --- handles and files
// ----------------------------------------------------------------------------

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
  Handle fcpl = make_plist(f.ctx_, H5P_FILE_CREATE, "H5Pcreate(H5P_FILE_CREATE)");
  // The root group keeps no modification time either (see untimed_dcpl).
  check(H5Pset_obj_track_times(fcpl.id(), false), f.ctx_, "H5Pset_obj_track_times");
  Handle fapl = file_access_plist(f.ctx_);
  // v1.8 object formats: compact/dense link storage, which keeps groups of thousands of tensors
  // fast; still readable by any HDF5 >= 1.8.
  check(H5Pset_libver_bounds(fapl.id(), H5F_LIBVER_V18, H5F_LIBVER_LATEST), f.ctx_,
        "H5Pset_libver_bounds");
  f.handle_ = Handle(
      check_id(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, fcpl.id(), fapl.id()), f.ctx_, "H5Fcreate"),
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

// --- groups and links
// -----------------------------------------------------------------------------

Handle create_group(const Ctx& ctx, hid_t loc, const std::string& name) {
  Handle gcpl = make_plist(ctx, H5P_GROUP_CREATE, "H5Pcreate(H5P_GROUP_CREATE)");
  check(H5Pset_obj_track_times(gcpl.id(), false), ctx, "H5Pset_obj_track_times", name);
  return Handle(check_id(H5Gcreate2(loc, name.c_str(), H5P_DEFAULT, gcpl.id(), H5P_DEFAULT), ctx,
                         "H5Gcreate2", name),
                H5Gclose);
}

Handle open_group(const Ctx& ctx, hid_t loc, const std::string& name) {
  if (!link_exists(ctx, loc, name)) fail_content(ctx, fmt::format("missing group '{}'", name));
  return Handle(check_id(H5Gopen2(loc, name.c_str(), H5P_DEFAULT), ctx, "H5Gopen2", name),
                H5Gclose);
}

bool link_exists(const Ctx& ctx, hid_t loc, const std::string& name) {
  // H5Lexists fails (rather than answering false) when a path's parent is missing, so the
  // components are checked from the first.
  std::string prefix = name.starts_with('/') ? "/" : "";
  size_t begin = prefix.size();
  while (begin <= name.size()) {
    size_t end = name.find('/', begin);
    if (end == std::string::npos) end = name.size();
    if (end > begin) {
      if (!prefix.empty() && prefix.back() != '/') prefix += '/';
      prefix += name.substr(begin, end - begin);
      if (!check_tri(H5Lexists(loc, prefix.c_str(), H5P_DEFAULT), ctx, "H5Lexists", prefix))
        return false;
    }
    begin = end + 1;
  }
  return true;
}

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

// --- datasets
// -------------------------------------------------------------------------------------

Handle create_dataset(const Ctx& ctx, hid_t loc, const std::string& name, hid_t file_type,
                      const std::vector<int64_t>& dims, size_t elem_bytes, bool checksum) {
  Handle space = scalar_or_simple_space(ctx, dims, name);
  Handle dcpl = untimed_dcpl(ctx, name);
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

Handle create_chunked(const Ctx& ctx, hid_t loc, const std::string& name, hid_t file_type,
                      const std::vector<int64_t>& dims, const std::vector<int64_t>& chunk,
                      bool checksum) {
  TS_CHECK(chunk.size() == dims.size() && !dims.empty(), "create_chunked({}): chunk rank", name);
  for (size_t i = 0; i < dims.size(); ++i)
    TS_CHECK(chunk[i] >= 1 && chunk[i] <= std::max<int64_t>(dims[i], 1),
             "create_chunked({}): chunk dim {} is {} of {}", name, i, chunk[i], dims[i]);
  Handle space = scalar_or_simple_space(ctx, dims, name);
  Handle dcpl = untimed_dcpl(ctx, name);
  const std::vector<hsize_t> h = to_hsize(chunk);
  check(H5Pset_chunk(dcpl.id(), int(h.size()), h.data()), ctx, "H5Pset_chunk", name);
  if (checksum) check(H5Pset_fletcher32(dcpl.id()), ctx, "H5Pset_fletcher32", name);
  return Handle(check_id(H5Dcreate2(loc, name.c_str(), file_type, space.id(), H5P_DEFAULT,
                                    dcpl.id(), H5P_DEFAULT),
                         ctx, "H5Dcreate2", name),
                H5Dclose);
}

void read_chunk(const Ctx& ctx, hid_t dset, const std::vector<int64_t>& offset, void* out,
                size_t bytes, const std::string& name) {
  const std::vector<hsize_t> at = to_hsize(offset);
  hsize_t stored = 0;
  check(H5Dget_chunk_storage_size(dset, at.data(), &stored), ctx, "H5Dget_chunk_storage_size",
        name);
  if (stored != bytes)
    fail_content(
        ctx, fmt::format("'{}': a chunk of {} bytes where {} were expected", name, stored, bytes));
  uint32_t filters = 0;
  check(H5Dread_chunk(dset, H5P_DEFAULT, at.data(), &filters, out), ctx, "H5Dread_chunk", name);
}

Handle open_dataset(const Ctx& ctx, hid_t loc, const std::string& name, size_t cache_bytes) {
  if (!link_exists(ctx, loc, name)) fail_content(ctx, fmt::format("missing dataset '{}'", name));
  Handle dapl = make_plist(ctx, H5P_DATASET_ACCESS, "H5Pcreate(H5P_DATASET_ACCESS)");
  if (cache_bytes > 0)
    check(H5Pset_chunk_cache(dapl.id(), kChunkCacheSlots, cache_bytes, H5D_CHUNK_CACHE_W0_DEFAULT),
          ctx, "H5Pset_chunk_cache", name);
  return Handle(check_id(H5Dopen2(loc, name.c_str(), dapl.id()), ctx, "H5Dopen2", name), H5Dclose);
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

namespace {

// `dset`'s file space with the box [offset, offset + count) selected.
Handle file_box(const Ctx& ctx, hid_t dset, const std::vector<int64_t>& offset,
                const std::vector<int64_t>& count, const std::string& name) {
  Handle fspace(check_id(H5Dget_space(dset), ctx, "H5Dget_space", name), H5Sclose);
  const std::vector<hsize_t> fstart = to_hsize(offset), hcount = to_hsize(count);
  check(H5Sselect_hyperslab(fspace.id(), H5S_SELECT_SET, fstart.data(), nullptr, hcount.data(),
                            nullptr),
        ctx, "H5Sselect_hyperslab", name);
  return fspace;
}

}  // namespace

void write_box(const Ctx& ctx, hid_t dset, hid_t mem_type, const std::vector<int64_t>& file_offset,
               const std::vector<int64_t>& count, const void* mem, const std::string& name) {
  TS_CHECK(file_offset.size() == count.size() && !count.empty(), "write_box rank for {}", name);
  for (int64_t c : count)
    if (c == 0) return;
  const Handle fspace = file_box(ctx, dset, file_offset, count, name);
  Handle mspace = scalar_or_simple_space(ctx, count, name);
  check(H5Dwrite(dset, mem_type, mspace.id(), fspace.id(), H5P_DEFAULT, mem), ctx, "H5Dwrite",
        name);
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
  const Handle fspace = file_box(ctx, dset, file_offset, count, name);
  Handle mspace = scalar_or_simple_space(ctx, mem_dims, name);
  const std::vector<hsize_t> mstart = to_hsize(mem_offset), hcount = to_hsize(count);
  check(H5Sselect_hyperslab(mspace.id(), H5S_SELECT_SET, mstart.data(), nullptr, hcount.data(),
                            nullptr),
        ctx, "H5Sselect_hyperslab", name);
  check(H5Dread(dset, mem_type, mspace.id(), fspace.id(), H5P_DEFAULT, mem), ctx, "H5Dread", name);
}

Handle create_growable_1d(const Ctx& ctx, hid_t loc, const std::string& name, hid_t file_type,
                          int64_t chunk_elems) {
  TS_CHECK(chunk_elems > 0, "create_growable_1d({}): chunk of {} elements", name, chunk_elems);
  const hsize_t dims[1] = {0}, max_dims[1] = {H5S_UNLIMITED};
  Handle space(check_id(H5Screate_simple(1, dims, max_dims), ctx, "H5Screate_simple", name),
               H5Sclose);
  Handle dcpl = untimed_dcpl(ctx, name);
  const hsize_t chunk[1] = {hsize_t(chunk_elems)};
  check(H5Pset_chunk(dcpl.id(), 1, chunk), ctx, "H5Pset_chunk", name);
  if (check_tri(H5Zfilter_avail(H5Z_FILTER_DEFLATE), ctx, "H5Zfilter_avail", name)) {
    check(H5Pset_shuffle(dcpl.id()), ctx, "H5Pset_shuffle", name);
    check(H5Pset_deflate(dcpl.id(), 1), ctx, "H5Pset_deflate", name);
  }
  check(H5Pset_fletcher32(dcpl.id()), ctx, "H5Pset_fletcher32", name);
  return Handle(check_id(H5Dcreate2(loc, name.c_str(), file_type, space.id(), H5P_DEFAULT,
                                    dcpl.id(), H5P_DEFAULT),
                         ctx, "H5Dcreate2", name),
                H5Dclose);
}

void append_1d(const Ctx& ctx, hid_t dset, hid_t mem_type, const void* data, int64_t n,
               const std::string& name) {
  TS_CHECK(n >= 0, "append_1d({}): {} elements", name, n);
  if (n == 0) return;
  const std::vector<int64_t> dims = dataset_dims(ctx, dset, name);
  TS_CHECK(dims.size() == 1, "append_1d({}): rank {}", name, dims.size());
  const hsize_t old_size = hsize_t(dims[0]), count = hsize_t(n), new_size = old_size + count;
  check(H5Dset_extent(dset, &new_size), ctx, "H5Dset_extent", name);
  Handle fspace(check_id(H5Dget_space(dset), ctx, "H5Dget_space", name), H5Sclose);
  check(H5Sselect_hyperslab(fspace.id(), H5S_SELECT_SET, &old_size, nullptr, &count, nullptr), ctx,
        "H5Sselect_hyperslab", name);
  Handle mspace(check_id(H5Screate_simple(1, &count, nullptr), ctx, "H5Screate_simple", name),
                H5Sclose);
  check(H5Dwrite(dset, mem_type, mspace.id(), fspace.id(), H5P_DEFAULT, data), ctx, "H5Dwrite",
        name);
}

void read_1d(const Ctx& ctx, hid_t dset, hid_t mem_type, int64_t offset, int64_t n, void* out,
             const std::string& name) {
  read_box(ctx, dset, mem_type, {offset}, {n}, out, {n}, {0}, name);
}

IntegerInfo integer_1d_info(const Ctx& ctx, hid_t dset, const std::string& name) {
  Handle type(check_id(H5Dget_type(dset), ctx, "H5Dget_type", name), H5Tclose);
  if (H5Tget_class(type.id()) != H5T_INTEGER)
    fail_content(
        ctx, fmt::format("dataset '{}' holds {}, expected integers", name, type_text(type.id())));
  IntegerInfo info;
  info.size_bytes = H5Tget_size(type.id());
  if (info.size_bytes == 0) fail(ctx, "H5Tget_size", name);
  const H5T_sign_t sign = H5Tget_sign(type.id());
  if (sign == H5T_SGN_ERROR) fail(ctx, "H5Tget_sign", name);
  info.is_signed = sign != H5T_SGN_NONE;
  const std::vector<int64_t> dims = dataset_dims(ctx, dset, name);
  if (dims.size() != 1)
    fail_content(
        ctx, fmt::format("dataset '{}' has rank {}, expected a 1-D dataset", name, dims.size()));
  info.length = dims[0];
  return info;
}

void write_string_dataset(const Ctx& ctx, hid_t loc, const std::string& name,
                          const std::string& value) {
  check_no_nul(value, name);
  // Size 0 is not a valid string type: an empty value is stored as one NUL of padding.
  const std::string padded = value.empty() ? std::string(1, '\0') : value;
  Handle type = string_type(ctx, StrType::fixed, padded.size(), name);
  Handle space = scalar_or_simple_space(ctx, {}, name);
  Handle dcpl = untimed_dcpl(ctx, name);
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
  const int64_t n = num_points(ctx, space.id(), name);
  if (n != 1) fail_content(ctx, fmt::format("'{}' holds {} values, expected one string", name, n));
  return read_strings(ctx, type.id(), space.id(), n, name, [&](hid_t mem, void* buf) {
    return H5Dread(dset.id(), mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf);
  })[0];
}

// --- attributes
// -----------------------------------------------------------------------------------

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
  write_attr(ctx, obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, space.id(),
             values.empty() ? nullptr : values.data());
}

std::vector<int64_t> read_attr_i64s(const Ctx& ctx, hid_t obj, const std::string& name) {
  const Attr a = open_attr(ctx, obj, name);
  if (H5Tget_class(a.type.id()) != H5T_INTEGER)
    fail_content(ctx, fmt::format("attribute '{}' must hold integers, found {}", name,
                                  type_text(a.type.id())));
  std::vector<int64_t> values(size_t(a.n), 0);
  if (a.n > 0) check(H5Aread(a.attr.id(), H5T_NATIVE_INT64, values.data()), ctx, "H5Aread", name);
  return values;
}

void write_attr_i64(const Ctx& ctx, hid_t obj, const std::string& name, int64_t value) {
  Handle space = scalar_or_simple_space(ctx, {}, name);
  write_attr(ctx, obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, space.id(), &value);
}

int64_t read_attr_i64(const Ctx& ctx, hid_t obj, const std::string& name) {
  return read_attr_number<int64_t>(ctx, obj, name, H5T_NATIVE_INT64);
}

void write_attr_f64(const Ctx& ctx, hid_t obj, const std::string& name, double value) {
  Handle space = scalar_or_simple_space(ctx, {}, name);
  write_attr(ctx, obj, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, space.id(), &value);
}

double read_attr_f64(const Ctx& ctx, hid_t obj, const std::string& name) {
  return read_attr_number<double>(ctx, obj, name, H5T_NATIVE_DOUBLE);
}

void write_attr_string(const Ctx& ctx, hid_t obj, const std::string& name, const std::string& value,
                       StrType type) {
  check_no_nul(value, name);
  Handle space = scalar_or_simple_space(ctx, {}, name);
  if (type == StrType::vlen) {
    Handle t = string_type(ctx, StrType::vlen, 0, name);
    const char* ptr = value.c_str();
    write_attr(ctx, obj, name, t.id(), t.id(), space.id(), &ptr);
    return;
  }
  const std::string padded = value.empty() ? std::string(1, '\0') : value;
  Handle t = string_type(ctx, StrType::fixed, padded.size(), name);
  write_attr(ctx, obj, name, t.id(), t.id(), space.id(), padded.data());
}

std::string read_attr_string(const Ctx& ctx, hid_t obj, const std::string& name) {
  std::vector<std::string> v = read_attr_strings(ctx, obj, name);
  if (v.size() != 1)
    fail_content(ctx, fmt::format("attribute '{}' holds {} strings, expected one", name, v.size()));
  return std::move(v[0]);
}

void write_attr_strings(const Ctx& ctx, hid_t obj, const std::string& name,
                        const std::vector<std::string>& values) {
  std::vector<const char*> ptrs;
  for (const auto& v : values) {
    check_no_nul(v, name);
    ptrs.push_back(v.c_str());
  }
  Handle type = string_type(ctx, StrType::vlen, 0, name);
  Handle space = scalar_or_simple_space(ctx, {int64_t(values.size())}, name);
  const char* none = nullptr;  // HDF5 refuses a null buffer even for zero elements
  write_attr(ctx, obj, name, type.id(), type.id(), space.id(),
             ptrs.empty() ? static_cast<const void*>(&none) : ptrs.data());
}

std::vector<std::string> read_attr_strings(const Ctx& ctx, hid_t obj, const std::string& name) {
  const Attr a = open_attr(ctx, obj, name);
  if (a.n == 0) return {};
  return read_strings(ctx, a.type.id(), a.space.id(), a.n, name,
                      [&](hid_t mem, void* buf) { return H5Aread(a.attr.id(), mem, buf); });
}

// --- listings
// -------------------------------------------------------------------------------------

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

namespace {

// Numeric attribute values as "v" (scalar) or "[v, w, ...]".
template <class T>
std::string numbers_text(const Ctx& ctx, const Attr& a, hid_t mem_type, const std::string& name) {
  std::vector<T> v(size_t(a.n));
  check(H5Aread(a.attr.id(), mem_type, v.data()), ctx, "H5Aread", name);
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += fmt::format("{}{}", i ? ", " : "", v[i]);
  return H5Sget_simple_extent_type(a.space.id()) == H5S_SCALAR ? s : "[" + s + "]";
}

}  // namespace

std::string attr_value_text(const Ctx& ctx, hid_t obj, const std::string& name, size_t max_chars) {
  // Numeric attributes longer than this are summarised by their length only.
  constexpr int64_t kMaxShownValues = 16;
  const Attr a = open_attr(ctx, obj, name);
  const H5T_class_t cls = H5Tget_class(a.type.id());
  std::string text;
  if (a.n == 0) {
    text = "[]";
  } else if ((cls == H5T_INTEGER || cls == H5T_FLOAT) && a.n > kMaxShownValues) {
    text = fmt::format("<{} {} values>", a.n, type_text(a.type.id()));
  } else if (cls == H5T_INTEGER && H5Tget_sign(a.type.id()) == H5T_SGN_NONE) {
    text = numbers_text<uint64_t>(ctx, a, H5T_NATIVE_UINT64, name);
  } else if (cls == H5T_INTEGER) {
    text = numbers_text<int64_t>(ctx, a, H5T_NATIVE_INT64, name);
  } else if (cls == H5T_FLOAT) {
    text = numbers_text<double>(ctx, a, H5T_NATIVE_DOUBLE, name);
  } else if (cls == H5T_STRING && a.n == 1) {
    text = read_strings(ctx, a.type.id(), a.space.id(), 1, name,
                        [&](hid_t mem, void* buf) { return H5Aread(a.attr.id(), mem, buf); })[0];
  } else {
    text = fmt::format("<{} x {}>", a.n, type_text(a.type.id()));
  }
  if (text.size() > max_chars) text = text.substr(0, max_chars) + "...";
  return text;
}

}  // namespace tessera::io::h5

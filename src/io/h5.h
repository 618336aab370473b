// Small RAII layer over the HDF5 C API (serial, 1.10 API only) for checkpoints and `inspect`:
// handles that close themselves, and checked wrappers for the calls io needs. Every failure names
// the HDF5 call, the file and the innermost HDF5 error message. Who is blamed depends on the file:
// a file the user handed us (Blame::file) that is missing, not HDF5, truncated or corrupt is a
// user error; a file we are writing (Blame::system) failing is a system error (disk, permissions).
// Not thread-safe (serial HDF5 is not). Independent of src/data's HDF5 helpers on purpose.
#pragma once
#include <hdf5.h>

#include <cstdint>
#include <string>
#include <vector>

namespace tessera::io::h5 {

enum class Blame { system, file };

// What a failure message names: the file and who is at fault.
struct Ctx {
  std::string path;
  Blame blame = Blame::system;
};

// Stops HDF5 from printing its error stack to stderr (we report errors ourselves). Idempotent;
// every function here that opens or creates a file calls it.
void quiet_errors();

// The current thread's HDF5 error stack as one line, innermost cause last ("" if empty).
std::string error_stack_text();

// Raises the error for a failed `call` on `obj` (a dataset or attribute name, may be empty):
// TS_USER_ERROR "file ... is corrupt or truncated" under Blame::file, else TS_SYSTEM_ERROR.
[[noreturn]] void fail(const Ctx& ctx, const char* call, const std::string& obj);
hid_t check_id(hid_t id, const Ctx& ctx, const char* call, const std::string& obj = "");
void check(herr_t rc, const Ctx& ctx, const char* call, const std::string& obj = "");
bool check_tri(htri_t rc, const Ctx& ctx, const char* call, const std::string& obj = "");

// Owns one hid_t and its close function. Destructors cannot report a failed close, so a file
// being written must be closed with File::close() (which checks the final flush).
class Handle {
 public:
  using CloseFn = herr_t (*)(hid_t);
  Handle() = default;
  Handle(hid_t id, CloseFn close_fn) : id_(id), close_fn_(close_fn) {}
  ~Handle() { reset(); }
  Handle(Handle&& o) noexcept : id_(o.id_), close_fn_(o.close_fn_) { o.id_ = H5I_INVALID_HID; }
  Handle& operator=(Handle&& o) noexcept;
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;

  hid_t id() const { return id_; }
  bool valid() const { return id_ >= 0; }
  void reset();                                                               // unchecked close
  void close(const Ctx& ctx, const char* call, const std::string& obj = "");  // checked close

 private:
  hid_t id_ = H5I_INVALID_HID;
  CloseFn close_fn_ = nullptr;
};

class File {
 public:
  // Creates (truncating) a file to write; failures are system errors.
  static File create(const std::string& path);
  // Opens a user-supplied file read-only. Missing, not a regular file, not HDF5, truncated or
  // unreadable: TS_USER_ERROR naming the path and the problem.
  static File open_read(const std::string& path);

  hid_t id() const { return handle_.id(); }
  const Ctx& ctx() const { return ctx_; }
  const std::string& path() const { return ctx_.path; }
  void close();  // flushes and closes, checked

 private:
  Handle handle_;
  Ctx ctx_;
};

// Groups and links.
Handle create_group(const Ctx& ctx, hid_t loc, const std::string& name);
Handle open_group(const Ctx& ctx, hid_t loc, const std::string& name);
bool link_exists(const Ctx& ctx, hid_t loc, const std::string& name);
std::vector<std::string> link_names(const Ctx& ctx, hid_t group);  // sorted by name

enum class ObjectKind { group, dataset, other };
ObjectKind object_kind(const Ctx& ctx, hid_t loc, const std::string& name);

// Datasets. `dims` empty means a scalar. With `checksum`, data is chunked (chunks of at most a
// few MiB) with the Fletcher-32 filter, so a corrupted byte fails the read instead of loading.
Handle create_dataset(const Ctx& ctx, hid_t loc, const std::string& name, hid_t file_type,
                      const std::vector<int64_t>& dims, size_t elem_bytes, bool checksum);
Handle open_dataset(const Ctx& ctx, hid_t loc, const std::string& name);
std::vector<int64_t> dataset_dims(const Ctx& ctx, hid_t dset, const std::string& name);
void write_dataset(const Ctx& ctx, hid_t dset, hid_t mem_type, const void* data,
                   const std::string& name);
// Reads the file box [file_offset, file_offset + count) of `dset` into the box at `mem_offset`
// of a row-major buffer of shape `mem_dims`. All vectors have the dataset's rank.
void read_box(const Ctx& ctx, hid_t dset, hid_t mem_type, const std::vector<int64_t>& file_offset,
              const std::vector<int64_t>& count, void* mem, const std::vector<int64_t>& mem_dims,
              const std::vector<int64_t>& mem_offset, const std::string& name);

// A text value as a scalar fixed-length UTF-8 string dataset (readable by h5dump and h5py).
// Values must not contain NUL bytes (trailing NULs are padding on read).
void write_string_dataset(const Ctx& ctx, hid_t loc, const std::string& name,
                          const std::string& value);
std::string read_string_dataset(const Ctx& ctx, hid_t loc, const std::string& name);

// Attributes on any object.
bool attr_exists(const Ctx& ctx, hid_t obj, const std::string& name);
std::vector<std::string> attr_names(const Ctx& ctx, hid_t obj);
void write_attr_i64s(const Ctx& ctx, hid_t obj, const std::string& name,
                     const std::vector<int64_t>& values);
std::vector<int64_t> read_attr_i64s(const Ctx& ctx, hid_t obj, const std::string& name);
void write_attr_string(const Ctx& ctx, hid_t obj, const std::string& name,
                       const std::string& value);
std::string read_attr_string(const Ctx& ctx, hid_t obj, const std::string& name);

// For generic listings: a short type name ("f32", "i64", "u16", "string[12]", "vlen string",
// "compound", ...) and an attribute's value as text, cut to `max_chars`.
std::string type_text(hid_t type);
std::string dataset_type_text(const Ctx& ctx, hid_t dset, const std::string& name);
std::string attr_value_text(const Ctx& ctx, hid_t obj, const std::string& name, size_t max_chars);

}  // namespace tessera::io::h5

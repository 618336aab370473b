// Small RAII wrappers over the HDF5 C API for the token dataset: every return code is checked.
// Who is blamed for a failure depends on the file: while reading a file the user gave us, a failure
// (missing object, truncated, corrupt, not HDF5) is a user error naming the file and what is wrong;
// while writing our own file it is a system error. HDF5's own error-stack printing is switched off
// (H5Eset_auto2 to null) and its innermost message is folded into ours instead.
// Not here: checkpoint I/O (src/io), which has its own needs.
#pragma once
#include <hdf5.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace tessera::h5 {

// Switches off HDF5's automatic error printing for the default stack (idempotent, thread-safe).
void silence_library_errors();

enum class Blame { user_file, system };

// Where an HDF5 call happens: the file, and who is at fault if it fails.
struct Context {
  std::string file;
  Blame blame = Blame::system;
};

// Raises the right error tier for a failed HDF5 call: "<file>: <what>: <innermost HDF5 message>".
[[noreturn]] void fail(const Context& ctx, std::string_view what);

// An owned hid_t (file, group, dataset, dataspace, datatype, attribute or property list).
class Handle {
 public:
  Handle() = default;
  Handle(hid_t id, herr_t (*close_fn)(hid_t)) : id_(id), close_fn_(close_fn) {}
  Handle(Handle&& o) noexcept : id_(o.id_), close_fn_(o.close_fn_) { o.id_ = H5I_INVALID_HID; }
  Handle& operator=(Handle&& o) noexcept;
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle();  // closes, ignoring failure (destructors cannot throw); use close() where it matters

  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  // Closes now and checks the return code (a file's close is where buffered data is written).
  void close(const Context& ctx, std::string_view what);

 private:
  hid_t id_ = H5I_INVALID_HID;
  herr_t (*close_fn_)(hid_t) = nullptr;
};

// --- files ---------------------------------------------------------------------------------------
// Creates (truncating) a file. Objects made here record no modification times, so equal contents
// give byte-identical files.
Handle create_file(const Context& ctx);
// Opens read-only. A missing path, a non-HDF5 file and a file HDF5 refuses (e.g. truncated) are
// user errors whatever ctx.blame says.
Handle open_file_read(const Context& ctx);
void flush_file(const Context& ctx, const Handle& file);

// --- groups, datasets ----------------------------------------------------------------------------
Handle create_group(const Context& ctx, const Handle& loc, const std::string& name);
bool has_link(const Context& ctx, const Handle& loc, const std::string& name);
// A missing object is reported as "missing <name>".
Handle open_group(const Context& ctx, const Handle& loc, const std::string& name);
Handle open_dataset(const Context& ctx, const Handle& loc, const std::string& name);

// Writes a 1-D dataset of `n` elements held in memory as `mem_type`, stored as `file_type`
// (HDF5 converts), chunked by up to `chunk` elements with shuffle + deflate level 1 when deflate
// is available, and a Fletcher-32 checksum per chunk (so corruption fails the read).
void write_1d(const Context& ctx, const Handle& loc, const std::string& name, hid_t file_type,
              hid_t mem_type, const void* data, int64_t n, int64_t chunk);

struct IntegerInfo {
  int64_t length = 0;     // elements (the dataset must be 1-D)
  size_t size_bytes = 0;  // of one stored element
  bool is_signed = false;
};
// Checks that `dset` is a 1-D integer dataset and describes it.
IntegerInfo integer_1d_info(const Context& ctx, const Handle& dset, const std::string& name);
// Reads the whole 1-D dataset converted to uint32 / int64.
std::vector<uint32_t> read_1d_u32(const Context& ctx, const Handle& dset, const std::string& name);
std::vector<int64_t> read_1d_i64(const Context& ctx, const Handle& dset, const std::string& name);

// --- attributes (on a file, group or dataset) ----------------------------------------------------
bool has_attr(const Context& ctx, const Handle& obj, const std::string& name);
void write_attr_string(const Context& ctx, const Handle& obj, const std::string& name,
                       const std::string& value);  // scalar, variable-length UTF-8
void write_attr_strings(const Context& ctx, const Handle& obj, const std::string& name,
                        const std::vector<std::string>& values);  // 1-D, variable-length UTF-8
void write_attr_int64(const Context& ctx, const Handle& obj, const std::string& name, int64_t v);
void write_attr_double(const Context& ctx, const Handle& obj, const std::string& name, double v);

// Readers: a missing attribute or one of the wrong class is a ctx-blamed error naming it.
// Strings may be stored fixed- or variable-length.
std::string read_attr_string(const Context& ctx, const Handle& obj, const std::string& name);
std::vector<std::string> read_attr_strings(const Context& ctx, const Handle& obj,
                                           const std::string& name);
int64_t read_attr_int64(const Context& ctx, const Handle& obj, const std::string& name);
double read_attr_double(const Context& ctx, const Handle& obj, const std::string& name);

}  // namespace tessera::h5

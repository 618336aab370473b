// The one RAII layer over the HDF5 C API (1.10 API) for checkpoints, `tessera inspect` and the
// token datasets of src/data: handles that close themselves and checked wrappers for the calls
// those need. Not here: what any file holds (checkpoint.h, data/dataset.h).
//
// Errors name the file, the object and, for a failed HDF5 call, the call and HDF5's innermost
// message. Who is blamed depends on the file: a file the user handed us (Blame::file) that is
// missing, not HDF5, truncated, corrupt or lacks an object is a user error; a file we are writing
// (Blame::system) failing is a system error (disk, permissions). HDF5's own printing of its error
// stack is switched off per thread (quiet_errors). HDF5 calls may come from any thread only when
// the library is built thread-safe (Debian's is); callers here keep HDF5 in one thread at a time.
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

// Stops HDF5 from printing its error stack to stderr on the calling thread (we report errors
// ourselves). Cheap and idempotent; every function here that opens or creates a file calls it.
void quiet_errors();

// The current thread's HDF5 error stack as one line, innermost cause last ("" if empty).
std::string error_stack_text();

// Raises the error for a failed HDF5 `call` on `obj` (a dataset or attribute name, may be empty):
// TS_USER_ERROR "HDF5 file ... is corrupt or truncated" under Blame::file, else TS_SYSTEM_ERROR.
[[noreturn]] void fail(const Ctx& ctx, const char* call, const std::string& obj);
// Raises the error for a problem our own checks found in a file ("missing dataset 'x'", a wrong
// type or shape): TS_USER_ERROR "<path>: <problem>" under Blame::file, else TS_SYSTEM_ERROR.
[[noreturn]] void fail_content(const Ctx& ctx, const std::string& problem);
hid_t check_id(hid_t id, const Ctx& ctx, const char* call, const std::string& obj = "");
void check(herr_t rc, const Ctx& ctx, const char* call, const std::string& obj = "");
bool check_tri(htri_t rc, const Ctx& ctx, const char* call, const std::string& obj = "");

// Owns one hid_t and its close function. Destructors cannot report a failed close, so an object
// being written must be closed with close() (a file's final flush is checked by File::close()).
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
  // Creates (truncating) a file to write; failures are system errors. Objects record no
  // modification times, so equal contents written in the same order give byte-identical files.
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

// Groups and links. Names may be paths ("/train/tokens"); open_* check every component first and
// report a missing one as "missing group/dataset '<name>'" (fail_content).
Handle create_group(const Ctx& ctx, hid_t loc, const std::string& name);
Handle open_group(const Ctx& ctx, hid_t loc, const std::string& name);
bool link_exists(const Ctx& ctx, hid_t loc, const std::string& name);  // every component
std::vector<std::string> link_names(const Ctx& ctx, hid_t group);      // sorted by name

enum class ObjectKind { group, dataset, other };
ObjectKind object_kind(const Ctx& ctx, hid_t loc, const std::string& name);

// Datasets of a fixed shape. `dims` empty means a scalar. With `checksum`, data is chunked (chunks
// of at most a few MiB) with the Fletcher-32 filter, so a corrupted byte fails the read instead of
// loading.
Handle create_dataset(const Ctx& ctx, hid_t loc, const std::string& name, hid_t file_type,
                      const std::vector<int64_t>& dims, size_t elem_bytes, bool checksum);
// A dataset of fixed shape `dims` stored in chunks of shape `chunk` (same rank, each 1..dims[i]),
// for data written a box at a time (write_box); with `checksum` each chunk is Fletcher-32
// checksummed, without it chunks are stored raw and can be read whole by read_chunk.
Handle create_chunked(const Ctx& ctx, hid_t loc, const std::string& name, hid_t file_type,
                      const std::vector<int64_t>& dims, const std::vector<int64_t>& chunk,
                      bool checksum);
// The stored bytes of the chunk at element `offset` of an unfiltered chunked dataset, exactly
// `bytes` of them, in the file's byte order (H5Dread_chunk: no selection, no conversion — the
// fast path for reading whole chunks at random).
void read_chunk(const Ctx& ctx, hid_t dset, const std::vector<int64_t>& offset, void* out,
                size_t bytes, const std::string& name);
// `cache_bytes` > 0 sets the dataset's chunk cache (HDF5's default is 1 MiB), e.g. to keep the
// chunks of a token stream that random window reads revisit.
Handle open_dataset(const Ctx& ctx, hid_t loc, const std::string& name, size_t cache_bytes = 0);
std::vector<int64_t> dataset_dims(const Ctx& ctx, hid_t dset, const std::string& name);
void write_dataset(const Ctx& ctx, hid_t dset, hid_t mem_type, const void* data,
                   const std::string& name);
// Writes the contiguous row-major buffer `mem` (shape `count`) to the file box
// [file_offset, file_offset + count) of `dset`.
void write_box(const Ctx& ctx, hid_t dset, hid_t mem_type, const std::vector<int64_t>& file_offset,
               const std::vector<int64_t>& count, const void* mem, const std::string& name);
// Reads the file box [file_offset, file_offset + count) of `dset` into the box at `mem_offset`
// of a row-major buffer of shape `mem_dims`. All vectors have the dataset's rank.
void read_box(const Ctx& ctx, hid_t dset, hid_t mem_type, const std::vector<int64_t>& file_offset,
              const std::vector<int64_t>& count, void* mem, const std::vector<int64_t>& mem_dims,
              const std::vector<int64_t>& mem_offset, const std::string& name);

// 1-D streams that grow as they are written (token ids, document offsets): chunks of
// `chunk_elems`, shuffle + deflate level 1 when deflate is available, and a Fletcher-32 checksum
// per chunk last in the pipeline (it checksums the stored bytes, so corruption fails the read).
Handle create_growable_1d(const Ctx& ctx, hid_t loc, const std::string& name, hid_t file_type,
                          int64_t chunk_elems);
// Appends `n` elements held in memory as `mem_type` (HDF5 converts to the stored type).
void append_1d(const Ctx& ctx, hid_t dset, hid_t mem_type, const void* data, int64_t n,
               const std::string& name);
// Elements [offset, offset + n) of a 1-D dataset, converted to `mem_type`.
void read_1d(const Ctx& ctx, hid_t dset, hid_t mem_type, int64_t offset, int64_t n, void* out,
             const std::string& name);

struct IntegerInfo {
  int64_t length = 0;     // elements (the dataset must be 1-D)
  size_t size_bytes = 0;  // of one stored element
  bool is_signed = false;
};
// Checks that `dset` is a 1-D integer dataset (fail_content otherwise) and describes it.
IntegerInfo integer_1d_info(const Ctx& ctx, hid_t dset, const std::string& name);

// A text value as a scalar fixed-length UTF-8 string dataset (readable by h5dump and h5py).
// Values must not contain NUL bytes (trailing NULs are padding on read).
void write_string_dataset(const Ctx& ctx, hid_t loc, const std::string& name,
                          const std::string& value);
std::string read_string_dataset(const Ctx& ctx, hid_t loc, const std::string& name);

// Attributes on any object. Writers replace an attribute of the same name. Readers report a
// missing attribute, or one of the wrong class or count, with fail_content naming it.
// Strings are UTF-8 without NUL bytes, stored fixed-length (NUL-padded: short values that h5dump
// shows inline) or variable-length (any size: the value lives in the global heap, not in the
// object header, so megabyte-sized tokenizer files fit). Readers accept either.
enum class StrType { fixed, vlen };
bool attr_exists(const Ctx& ctx, hid_t obj, const std::string& name);
std::vector<std::string> attr_names(const Ctx& ctx, hid_t obj);
void write_attr_i64s(const Ctx& ctx, hid_t obj, const std::string& name,
                     const std::vector<int64_t>& values);  // 1-D (null dataspace when empty)
std::vector<int64_t> read_attr_i64s(const Ctx& ctx, hid_t obj, const std::string& name);
void write_attr_i64(const Ctx& ctx, hid_t obj, const std::string& name, int64_t value);  // scalar
int64_t read_attr_i64(const Ctx& ctx, hid_t obj, const std::string& name);  // exactly one value
void write_attr_f64(const Ctx& ctx, hid_t obj, const std::string& name, double value);  // scalar
double read_attr_f64(const Ctx& ctx, hid_t obj, const std::string& name);  // one number
void write_attr_string(const Ctx& ctx, hid_t obj, const std::string& name, const std::string& value,
                       StrType type = StrType::fixed);                             // scalar
std::string read_attr_string(const Ctx& ctx, hid_t obj, const std::string& name);  // one string
void write_attr_strings(const Ctx& ctx, hid_t obj, const std::string& name,
                        const std::vector<std::string>& values);  // 1-D, variable-length
std::vector<std::string> read_attr_strings(const Ctx& ctx, hid_t obj, const std::string& name);

// For generic listings: a short type name ("f32", "i64", "u16", "string[12]", "vlen string",
// "compound", ...) and an attribute's value as text, cut to `max_chars`.
std::string type_text(hid_t type);
std::string dataset_type_text(const Ctx& ctx, hid_t dset, const std::string& name);
std::string attr_value_text(const Ctx& ctx, hid_t obj, const std::string& name, size_t max_chars);

}  // namespace tessera::io::h5

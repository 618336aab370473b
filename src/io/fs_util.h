// File-system steps that make checkpoint writes durable and atomic: fsync of files and directories,
// rename (plain, and an atomic directory swap), listing `step_<N>` directories, checked removal.
// Every failure is TS_SYSTEM_ERROR naming the call, the path and errno's text. Nothing here knows
// about HDF5 or about what a checkpoint contains.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace tessera::io {

// Flushes a file's data and metadata to stable storage (open + fsync + close).
void fsync_file(const std::string& path);
// Flushes a directory's entries (needed after creating, renaming or removing entries in it).
void fsync_dir(const std::string& path);

// rename(2): atomic on one file system; replaces `to` when it is a file or an empty directory.
void rename_path(const std::string& from, const std::string& to);

// Moves directory `from` to `to`, replacing an existing `to`. With `allow_exchange` (the default)
// the two are swapped atomically with renameat2(RENAME_EXCHANGE), so `to` names a complete
// directory at every instant; where the file system cannot (EINVAL/ENOSYS) or when
// `allow_exchange` is false, `to` is first renamed to `to_old_aside`, then `from` to `to`:
// a crash between the two renames leaves `to` absent (the old contents stay in the aside path).
// Either way the old contents are removed afterwards and the parent directory is fsynced.
void replace_dir(const std::string& from, const std::string& to, const std::string& to_old_aside,
                 bool allow_exchange = true);

// Creates a directory and its missing parents (no error if it exists as a directory).
void make_dirs(const std::string& path);
// Removes a file or a directory tree; no error if it does not exist.
void remove_tree(const std::string& path);

// The temporary file of an atomic write of `final_path`: "<final_path>.tmp-<pid>", removed when
// this is destroyed unless `committed` (the writer fsyncs it, renames it over the final path and
// sets committed). Declare it before the handles that write it, so it is destroyed after them.
struct TempPath {
  explicit TempPath(const std::string& final_path);
  ~TempPath();
  TempPath(const TempPath&) = delete;
  TempPath& operator=(const TempPath&) = delete;
  std::string path;
  bool committed = false;
};

// Writes `text` to `path` (truncating) and fsyncs the file.
void write_file_synced(const std::string& path, const std::string& text);

// One `step_<N>` entry of a checkpoints directory.
struct StepDir {
  int64_t step = 0;
  std::string path;
};
// Directories named exactly `step_<digits>` directly under `dir`, ascending by step; an absent
// `dir` gives an empty list. Other entries (temporaries, files) are skipped.
std::vector<StepDir> list_step_dirs(const std::string& dir);
// Parses "step_<digits>" (no sign, no trailing text); false otherwise.
bool parse_step_dir_name(const std::string& name, int64_t* step);

}  // namespace tessera::io

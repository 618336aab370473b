// POSIX implementation of the durable-rename helpers in fs_util.h. Every call's return code is
// checked; errors carry the call, the path and strerror(errno).
#include "io/fs_util.h"

#include <fcntl.h>
#include <stdio.h>  // renameat2, RENAME_EXCHANGE (glibc >= 2.28)
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>

#include "core/error.h"

namespace tessera::io {

namespace fs = std::filesystem;

namespace {

std::string errno_text(int err) { return std::strerror(err); }

void fsync_path(const std::string& path, int flags, const char* what) {
  int fd = -1;
  do {
    fd = ::open(path.c_str(), flags | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) TS_SYSTEM_ERROR("open({}) for fsync of a {}: {}", path, what, errno_text(errno));
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    TS_SYSTEM_ERROR("fsync({}): {}", path, errno_text(err));
  }
  if (::close(fd) != 0) TS_SYSTEM_ERROR("close({}) after fsync: {}", path, errno_text(errno));
}

std::string parent_of(const std::string& path) {
  const fs::path p = fs::path(path).parent_path();
  return p.empty() ? std::string(".") : p.string();
}

}  // namespace

void fsync_file(const std::string& path) { fsync_path(path, O_RDONLY, "file"); }

void fsync_dir(const std::string& path) { fsync_path(path, O_RDONLY | O_DIRECTORY, "directory"); }

void rename_path(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0)
    TS_SYSTEM_ERROR("rename({}, {}): {}", from, to, errno_text(errno));
}

void replace_dir(const std::string& from, const std::string& to, const std::string& to_old_aside,
                 bool allow_exchange) {
  std::error_code ec;
  const bool to_exists = fs::exists(to, ec);
  if (ec) TS_SYSTEM_ERROR("stat({}): {}", to, ec.message());
  if (!to_exists) {
    rename_path(from, to);
    fsync_dir(parent_of(to));
    return;
  }
#ifdef RENAME_EXCHANGE
  if (allow_exchange) {
    if (::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_EXCHANGE) == 0) {
      fsync_dir(parent_of(to));
      remove_tree(from);  // now holds the replaced contents
      fsync_dir(parent_of(from));
      return;
    }
    if (errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP)
      TS_SYSTEM_ERROR("renameat2({}, {}, RENAME_EXCHANGE): {}", from, to, errno_text(errno));
    // The file system cannot swap: fall through to the two-rename sequence.
  }
#endif
  remove_tree(to_old_aside);  // a leftover from an earlier crash in this same window
  rename_path(to, to_old_aside);
  rename_path(from, to);
  fsync_dir(parent_of(to));
  remove_tree(to_old_aside);
  fsync_dir(parent_of(to_old_aside));
}

void make_dirs(const std::string& path) {
  std::error_code ec;
  fs::create_directories(path, ec);
  if (ec) TS_SYSTEM_ERROR("create_directories({}): {}", path, ec.message());
  if (!fs::is_directory(path, ec))
    TS_SYSTEM_ERROR("create_directories({}): exists but is not a directory", path);
}

void remove_tree(const std::string& path) {
  std::error_code ec;
  fs::remove_all(path, ec);
  if (ec) TS_SYSTEM_ERROR("remove_all({}): {}", path, ec.message());
}

TempPath::TempPath(const std::string& final_path)
    : path(final_path + ".tmp-" + std::to_string(static_cast<long>(::getpid()))) {}

TempPath::~TempPath() {
  if (!committed) ::unlink(path.c_str());
}

void write_file_synced(const std::string& path, const std::string& text) {
  int fd = -1;
  do {
    fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) TS_SYSTEM_ERROR("open({}) for writing: {}", path, errno_text(errno));
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      TS_SYSTEM_ERROR("write({}): {}", path, errno_text(err));
    }
    done += size_t(n);
  }
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    TS_SYSTEM_ERROR("fsync({}): {}", path, errno_text(err));
  }
  if (::close(fd) != 0) TS_SYSTEM_ERROR("close({}): {}", path, errno_text(errno));
}

bool parse_step_dir_name(const std::string& name, int64_t* step) {
  static constexpr std::string_view kPrefix = "step_";
  if (name.size() <= kPrefix.size() || name.compare(0, kPrefix.size(), kPrefix) != 0) return false;
  const std::string digits = name.substr(kPrefix.size());
  // 18 digits always fit in int64_t; longer names are not ours.
  if (digits.size() > 18) return false;
  if (!std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return false;
  *step = std::stoll(digits);
  return true;
}

std::vector<StepDir> list_step_dirs(const std::string& dir) {
  std::vector<StepDir> out;
  std::error_code ec;
  if (!fs::exists(dir, ec)) return out;
  fs::directory_iterator it(dir, ec);
  if (ec) TS_SYSTEM_ERROR("listing directory {}: {}", dir, ec.message());
  for (; it != fs::directory_iterator(); it.increment(ec)) {
    if (ec) TS_SYSTEM_ERROR("listing directory {}: {}", dir, ec.message());
    int64_t step = 0;
    if (!parse_step_dir_name(it->path().filename().string(), &step)) continue;
    if (!it->is_directory(ec)) continue;
    out.push_back({step, it->path().string()});
  }
  if (ec) TS_SYSTEM_ERROR("listing directory {}: {}", dir, ec.message());
  std::sort(out.begin(), out.end(),
            [](const StepDir& a, const StepDir& b) { return a.step < b.step; });
  return out;
}

}  // namespace tessera::io

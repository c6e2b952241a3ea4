#!/usr/bin/env bash
# Bundles built binaries for the device machine (deploy/DEVICE.md).
# Usage: scripts/package_device.sh OUT_DIR BINARY...
# Copies each BINARY into OUT_DIR/ and every shared library `ldd` lists for them into OUT_DIR/lib/,
# except those the device image has or that must come from its driver and CUDA 13
# (/usr/local/cuda/lib64): libc, libm, libdl, librt, libpthread, ld-linux, libcuda, libnvidia-*,
# libcudart, libcublas, libcublasLt (and glibc's other parts: libresolv, libnss_*, ...). Strips the copies (strip --strip-unneeded), writes
# OUT_DIR/env.sh (source it: LD_LIBRARY_PATH=OUT_DIR/lib:/usr/local/cuda/lib64:...) and prints the
# sizes. Then: tar cJf OUT_DIR.txz OUT_DIR, carry it, extract on the device, source env.sh, run.
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 OUT_DIR BINARY..." >&2
  exit 2
fi
OUT=$1
shift
mkdir -p "$OUT/lib"
STRIP=${STRIP:-strip}

# Libraries left to the device machine (basename patterns).
skip_lib() {
  case "$1" in
    linux-vdso.so* | linux-gate.so* | ld-linux*.so* | ld64.so*) return 0 ;;
    libc.so* | libm.so* | libdl.so* | librt.so* | libpthread.so* | libutil.so*) return 0 ;;
    # glibc's other pieces: tied to the device's own libc version, never bundled.
    libresolv.so* | libnsl.so* | libnss_*.so* | libanl.so* | libmvec.so* | libthread_db.so*) return 0 ;;
    libcuda.so* | libnvidia-*.so* | libcudart.so* | libcublas.so* | libcublasLt.so*) return 0 ;;
  esac
  return 1
}

declare -A copied=()
missing=0
for bin in "$@"; do
  if [ ! -f "$bin" ]; then
    echo "error: $bin: no such file" >&2
    exit 1
  fi
  dst="$OUT/$(basename "$bin")"
  cp -L "$bin" "$dst"
  chmod u+w "$dst"
  "$STRIP" --strip-unneeded "$dst" 2>/dev/null || echo "warning: could not strip $dst" >&2
  # ldd lines: "libfoo.so.1 => /path/libfoo.so.1 (0x...)", "/lib64/ld-linux... (0x...)",
  # "linux-vdso.so.1 (0x...)" or "libfoo.so.1 => not found".
  while read -r name arrow path _; do
    [ -n "$name" ] || continue
    skip_lib "$(basename "$name")" && continue
    if [ "$arrow" != "=>" ]; then
      continue  # the loader itself or the vDSO: no "=>"
    fi
    if [ "$path" = "not" ]; then
      echo "error: $bin needs $name, which ldd cannot find here" >&2
      missing=1
      continue
    fi
    [ -n "${copied[$name]:-}" ] && continue
    copied[$name]=1
    # Keep the name the binary asks for (the soname), copying the file the link points to.
    cp -L "$path" "$OUT/lib/$name"
    chmod u+w "$OUT/lib/$name"
    "$STRIP" --strip-unneeded "$OUT/lib/$name" 2>/dev/null ||
      echo "warning: could not strip $OUT/lib/$name" >&2
  done < <(ldd "$bin" 2>/dev/null || true)
done
[ "$missing" = 0 ] || exit 1

cat >"$OUT/env.sh" <<'EOF'
# Source this on the device machine: puts the bundled libraries ahead of CUDA 13's.
_pmkv_here=$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)
export LD_LIBRARY_PATH="$_pmkv_here/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="$_pmkv_here:$PATH"
unset _pmkv_here
EOF

echo "binaries:"
for bin in "$@"; do
  b="$OUT/$(basename "$bin")"
  printf '  %10s  %s\n' "$(du -h "$b" | cut -f1)" "$b"
done
echo "libraries (${#copied[@]}):"
if [ ${#copied[@]} -gt 0 ]; then
  for n in $(printf '%s\n' "${!copied[@]}" | sort); do
    printf '  %10s  %s\n' "$(du -h "$OUT/lib/$n" | cut -f1)" "$OUT/lib/$n"
  done
fi
echo "total: $(du -sh "$OUT" | cut -f1) ($(du -sb "$OUT" | cut -f1) bytes) in $OUT"

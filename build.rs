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
//! per device and dtype), against the same libtorch headers.
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
    let root = lib.parent().expect("libtorch lib/ has a parent");
    // torch-sys builds its own C++ with the ABI that matches the PyPI wheels (new ABI since 2.x).
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("src/shim/autocast.cpp")
        .compile("medgen_shim");
}

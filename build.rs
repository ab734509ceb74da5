//! Link-time settings that tch does not give to its dependents, and the C++ shim.
//!
//! torch-sys finds libtorch (from `LIBTORCH`, set in `.cargo/config.toml` to the libtorch
//! inside the project's `.venv`, or from the user's own `LIBTORCH`) and exports its `lib/`
//! directory to direct dependents as `DEP_TCH_LIBTORCH_LIB`. We use it for two things tch
//! leaves to us:
//! * an rpath, so `medgen` and the test binaries start without `LD_LIBRARY_PATH`;
//! * on ELF targets, `--no-as-needed` before the torch libraries, otherwise the linker drops
//!   `libtorch_cuda.so` (nothing references it by symbol) and CUDA reports unavailable. Apple's
//!   linker keeps every library it is given and rejects that flag, so macOS gets the rpath only.
//!
//! It also compiles `src/shim/*.cpp`, the few libtorch entry points tch does not wrap (autocast
//! per device and dtype; cuDNN/TF32 determinism flags; c10d's store and process groups for
//! distributed training), against the same libtorch headers. The Gloo process group needs Gloo's
//! headers (`MEDGEN_GLOO_INCLUDE`, set in `.cargo/config.toml` to where `make setup` puts them).
//! Where libtorch has CUDA, the NCCL process group is always compiled: its headers come from the
//! nvidia wheels next to torch in the same site-packages (`nccl.h` from nvidia-nccl, the CUDA
//! runtime's from nvidia-cuda-runtime; `crt/` and `nv/target` from nvidia-cuda-crt and
//! nvidia-cuda-cccl, which `make setup` installs),
//! or from `MEDGEN_CUDA_INCLUDE` (a CUDA toolkit's include directory). `nccl.h` must be the NCCL
//! version the torch wheel requires: c10d's NCCL headers change their class layouts with
//! `NCCL_VERSION_CODE`, so another version would compile against objects libtorch does not have.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = PathBuf::from(std::env::var_os("DEP_TCH_LIBTORCH_LIB").unwrap_or_else(|| {
        panic!(
            "medgen: torch-sys did not export its libtorch directory (DEP_TCH_LIBTORCH_LIB), so the C++ shim \
             (src/shim/*.cpp) cannot be compiled against libtorch's headers; is torch-sys's version the one \
             Cargo.toml pins?"
        )
    }));
    // build.rs runs on the host: the target's linker decides which flags are valid.
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let has_cuda = lib.join("libtorch_cuda.so").exists();
    compile_shim(&lib, has_cuda);
    match target_os.as_str() {
        "windows" => {}
        "macos" | "ios" => println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display()),
        _ => {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            if has_cuda {
                println!("cargo:rustc-link-arg=-ltorch_cuda");
            }
            println!("cargo:rustc-link-arg=-ltorch_cpu");
            println!("cargo:rustc-link-arg=-ltorch");
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
        }
    }
}

fn compile_shim(lib: &Path, has_cuda: bool) {
    for f in ["autocast.cpp", "determinism.cpp", "dist.cpp"] {
        println!("cargo:rerun-if-changed=src/shim/{f}");
    }
    println!("cargo:rerun-if-env-changed=MEDGEN_GLOO_INCLUDE");
    println!("cargo:rerun-if-env-changed=MEDGEN_CUDA_INCLUDE");
    let root = lib.parent().expect("libtorch lib/ has a parent");
    // torch-sys builds its own C++ with the ABI that matches the PyPI wheels (new ABI since 2.x).
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_string());
    let torch_includes = [root.join("include"), root.join("include/torch/csrc/api/include")];
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .pic(true)
            .warnings(false)
            .includes(&torch_includes)
            .flag("-std=c++17")
            .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
            .flag("-DGLOG_USE_GLOG_EXPORT");
        b
    };
    let mut core = base();
    core.file("src/shim/autocast.cpp").file("src/shim/determinism.cpp");
    compile(&core, "medgen_shim", &torch_includes, "");

    let mut dist = base();
    let mut includes = torch_includes.to_vec();
    match std::env::var_os("MEDGEN_GLOO_INCLUDE").map(PathBuf::from) {
        Some(dir) if dir.join("gloo/config.h").exists() => {
            dist.include(&dir).define("USE_C10D_GLOO", None);
            includes.push(dir);
        }
        other => println!(
            "cargo:warning=Gloo headers not found ({}): distributed training will be unavailable; `make setup` \
             fetches them (or set GLOO_INCLUDE for it)",
            other.map_or("MEDGEN_GLOO_INCLUDE unset".to_string(), |d| format!("no gloo/config.h in {}", d.display()))
        ),
    }
    if has_cuda {
        let site = root.canonicalize().ok().and_then(|r| r.parent().map(Path::to_path_buf));
        let cuda = match nccl_includes(site.as_deref()) {
            Ok(dirs) => dirs,
            Err(e) => panic!("medgen: {e}"),
        };
        for d in &cuda {
            dist.include(d);
        }
        includes.extend(cuda);
        dist.define("USE_C10D_NCCL", None).define("USE_CUDA", None);
    }
    dist.file("src/shim/dist.cpp");
    compile(
        &dist,
        "medgen_dist",
        &includes,
        if has_cuda {
            " With NCCL: CUDA headers of another release than libtorch's (CUDA 13.0 for torch 2.13.0)."
        } else {
            ""
        },
    );
}

/// One clear message instead of a page of compiler output ending in cc's generic panic.
fn compile(b: &cc::Build, name: &str, includes: &[PathBuf], cause: &str) {
    if let Err(e) = b.try_compile(name) {
        let dirs: Vec<String> = includes.iter().map(|d| d.display().to_string()).collect();
        panic!(
            "medgen: the C++ shim `{name}` (src/shim/) did not compile: {e}\n  include directories: {}\n  likely \
             causes: no C++17 compiler (set CXX), libtorch headers that are not libtorch 2.13.0's (LIBTORCH), or a \
             LIBTORCH_CXX11_ABI that does not match libtorch.{cause} The compiler's own messages are above.",
            dirs.join(", ")
        );
    }
}

/// The directories holding `cuda_runtime_api.h`, `crt/host_config.h`, `nv/target` and `nccl.h`
/// for c10d's NCCL headers, after checking that `nccl.h` is the NCCL the torch wheel was built with.
fn nccl_includes(site: Option<&Path>) -> Result<Vec<PathBuf>, String> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("MEDGEN_CUDA_INCLUDE").map(PathBuf::from).into_iter().collect();
    if let Some(Ok(entries)) = site.map(|s| std::fs::read_dir(s.join("nvidia"))) {
        let mut wheels: Vec<PathBuf> =
            entries.flatten().map(|e| e.path().join("include")).filter(|p| p.is_dir()).collect();
        wheels.sort();
        candidates.extend(wheels);
    }
    let find = |rel: &str| candidates.iter().find(|d| d.join(rel).is_file()).cloned();
    let wanted = ["cuda_runtime_api.h", "crt/host_config.h", "nv/target", "nccl.h"];
    let found: Vec<Option<PathBuf>> = wanted.iter().map(|r| find(r)).collect();
    let missing: Vec<&str> = wanted.iter().zip(&found).filter(|(_, f)| f.is_none()).map(|(w, _)| *w).collect();
    if !missing.is_empty() {
        let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
        return Err(format!(
            "libtorch has CUDA, so medgen compiles c10d's NCCL process group, which needs {} (looked in: {}). \
             `make setup` installs them into .venv (nvidia-cuda-crt and nvidia-cuda-cccl, tests/requirements.txt); with \
             another libtorch, set MEDGEN_CUDA_INCLUDE to a CUDA toolkit's include directory of libtorch's CUDA \
             release",
            missing.join(", "),
            if looked.is_empty() { "nowhere: no site-packages/nvidia next to libtorch".to_string() } else { looked.join(", ") }
        ));
    }
    let nccl_h = found[3].as_ref().expect("checked").join("nccl.h");
    println!("cargo:rerun-if-changed={}", nccl_h.display());
    let header = nccl_version(&nccl_h)?;
    match site.map(torch_nccl_requirement).transpose()?.flatten() {
        Some((metadata, wheel)) => {
            println!("cargo:rerun-if-changed={}", metadata.display());
            if header != wheel {
                return Err(format!(
                    "{} is NCCL {}, but libtorch was built with NCCL {} ({} requires it): c10d's NCCL classes would \
                     not match libtorch's. Install that version (`pip install nvidia-nccl-cu13=={}` in the venv, or \
                     `make setup`), or point MEDGEN_CUDA_INCLUDE at its headers",
                    nccl_h.display(),
                    fmt_version(header),
                    fmt_version(wheel),
                    metadata.display(),
                    fmt_version(wheel)
                ));
            }
        }
        None => println!(
            "cargo:warning=libtorch at {} is not from a torch wheel (no torch-*.dist-info next to it): nccl.h (NCCL {}) \
             cannot be checked against the NCCL libtorch was built with",
            site.map_or("?".to_string(), |s| s.display().to_string()),
            fmt_version(header)
        ),
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for d in found.into_iter().flatten() {
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    Ok(dirs)
}

type Version = (u32, u32, u32);

fn fmt_version((a, b, c): Version) -> String {
    format!("{a}.{b}.{c}")
}

/// NCCL_MAJOR, NCCL_MINOR and NCCL_PATCH of an `nccl.h`.
fn nccl_version(path: &Path) -> Result<Version, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let define = |name: &str| {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("#define ")?.trim().strip_prefix(name)?.trim().parse::<u32>().ok())
            .next()
            .ok_or_else(|| format!("{}: no numeric #define {name}", path.display()))
    };
    Ok((define("NCCL_MAJOR")?, define("NCCL_MINOR")?, define("NCCL_PATCH")?))
}

/// The exact `nvidia-nccl-cu*==X.Y.Z` requirement in the torch wheel's METADATA (the NCCL its
/// binaries were built and are shipped with), or `None` when libtorch is not from a wheel.
fn torch_nccl_requirement(site: &Path) -> Result<Option<(PathBuf, Version)>, String> {
    let Ok(entries) = std::fs::read_dir(site) else { return Ok(None) };
    let Some(metadata) = entries
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.starts_with("torch-") && n.ends_with(".dist-info")
        })
        .map(|d| d.join("METADATA"))
        .filter(|m| m.is_file())
    else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(&metadata).map_err(|e| format!("cannot read {}: {e}", metadata.display()))?;
    for line in text.lines() {
        let Some(req) = line.strip_prefix("Requires-Dist:").map(str::trim) else { continue };
        let Some(rest) = req.strip_prefix("nvidia-nccl-cu") else { continue };
        let Some((_, v)) = rest.split_once("==") else { continue };
        let v = v.split([';', ' ', ',']).next().unwrap_or("");
        let parts: Vec<u32> = v.split('.').filter_map(|p| p.parse().ok()).collect();
        if let [a, b, c, ..] = parts[..] {
            return Ok(Some((metadata, (a, b, c))));
        }
        return Err(format!("{}: cannot read the NCCL version in `{req}`", metadata.display()));
    }
    Err(format!(
        "{}: the torch wheel requires no exact nvidia-nccl-cu* version, so nccl.h cannot be checked against libtorch's",
        metadata.display()
    ))
}

use clap::Parser;

fn main() {
    tune_malloc();
    medgen::panics::install_hook();
    let cli = medgen::cli::Cli::parse();
    if let Err(e) = medgen::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// libtorch's CPU tensors come from glibc malloc. By default glibc hands buffers of a few MiB back to the kernel
/// when they are freed (mmap threshold, heap trimming), so the next step's buffers of the same sizes come back as
/// fresh pages that the kernel must fault in and zero: a quarter of a reference-config training step went to
/// `clear_page` (perf). Keeping freed memory in the heap for reuse removes that without raising the peak, which is
/// set by the largest step anyway (bench/results.md). The same as `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_`
/// in the environment, which still override these values.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |var: &str| std::env::var_os(var).is_some();
        // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
        unsafe {
            if !set("MALLOC_MMAP_THRESHOLD_") {
                // glibc's largest allowed threshold (32 MiB on 64-bit); bigger buffers are still mapped.
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            }
            if !set("MALLOC_TRIM_THRESHOLD_") {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            }
        }
    }
}

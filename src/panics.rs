//! Panics: the binary's last line of defence, and the scopes that turn a panic into an error.
//!
//! Bad input is meant to be an error long before it reaches code that can panic; a panic is a bug.
//! The hook `medgen` installs prints one line, `internal error at file:line: message, please report`, and
//! ends the process with [`EXIT_INTERNAL`] (the full backtrace with `RUST_BACKTRACE=1`). Ending the process
//! at once, from whichever thread panicked, means a panic in a worker thread can never leave the others
//! waiting for it. Code that expects panics (a third-party decoder on a corrupt file, the data loader's
//! background thread) runs them inside [`catch`], where the hook only records where the panic happened.
use std::cell::{Cell, RefCell};
use std::io::Write;
use std::panic::PanicHookInfo;

/// The exit code of an internal error (sysexits' `EX_SOFTWARE`); bad input exits with 1.
pub const EXIT_INTERNAL: i32 = 70;

thread_local! {
    /// How many `catch` scopes this thread is inside.
    static CATCHING: Cell<usize> = const { Cell::new(0) };
    /// The last panic caught on this thread, as `file:line: message`.
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// `file:line: message` of a panic.
fn describe(info: &PanicHookInfo) -> String {
    let msg = payload_message(info.payload());
    match info.location() {
        Some(l) => format!("{}:{}: {msg}", l.file(), l.line()),
        None => msg,
    }
}

fn payload_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Runs `f`; a panic inside it is returned as `internal error at file:line: message` instead of unwinding
/// further (with the hook installed, nothing is printed for it).
pub fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    CATCHING.with(|c| c.set(c.get() + 1));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(c.get() - 1));
    result.map_err(|payload| {
        let what = CAUGHT.with(|c| c.borrow_mut().take()).unwrap_or_else(|| payload_message(payload.as_ref()));
        format!("internal error at {what}")
    })
}

/// Installs the hook described in the module documentation (the `medgen` binary does, first thing).
pub fn install_hook() {
    std::panic::set_hook(Box::new(|info| {
        let what = describe(info);
        let backtrace = std::backtrace::Backtrace::capture();
        let traced = backtrace.status() == std::backtrace::BacktraceStatus::Captured;
        if CATCHING.with(Cell::get) > 0 {
            if traced {
                eprintln!("caught panic at {what}\n{backtrace}");
            }
            CAUGHT.with(|c| *c.borrow_mut() = Some(what));
            return;
        }
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "internal error at {what}, please report");
        if traced {
            let _ = writeln!(err, "{backtrace}");
        }
        let _ = err.flush();
        let _ = std::io::stdout().flush();
        exit_now(EXIT_INTERNAL);
    }));
}

/// Ends the process without running exit handlers: other threads may be inside libtorch, whose static
/// destructors must not run under them.
fn exit_now(code: i32) -> ! {
    #[cfg(unix)]
    // SAFETY: _exit only ends the process; the streams that matter were flushed above.
    unsafe {
        libc::_exit(code)
    }
    #[cfg(not(unix))]
    std::process::exit(code)
}

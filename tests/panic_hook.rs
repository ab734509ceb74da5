//! The last line of defence (`medgen::panics`): a panic anywhere prints one line and exits 70, from the main
//! thread or a worker thread (never a hang), with the backtrace only under `RUST_BACKTRACE=1`; a panic inside
//! `catch` is an error instead. Each scenario runs in a child process (this test binary again, one test
//! selected by an environment variable), since the hook ends the process.
mod common;

use std::process::{Command, Output};

const SCENARIO: &str = "MEDGEN_PANIC_SCENARIO";

/// In the child: installs the hook and runs the scenario. In the parent: nothing.
fn child_scenario() -> bool {
    let Ok(s) = std::env::var(SCENARIO) else { return false };
    medgen::panics::install_hook();
    match s.as_str() {
        "main" => panic!("boom on the main thread"),
        "worker" => {
            use rayon::prelude::*;
            // A rayon worker panics while this thread waits for the whole job.
            let _: Vec<u32> = (0..64u32)
                .into_par_iter()
                .map(|i| {
                    if i == 37 {
                        panic!("boom in a worker")
                    }
                    i
                })
                .collect();
        }
        "detached" => {
            // A background thread panics while the main thread would wait forever for it.
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            std::thread::spawn(move || {
                let _keep = tx;
                panic!("boom in a background thread")
            });
            std::thread::sleep(std::time::Duration::from_secs(60));
            drop(rx);
        }
        "caught" => {
            let e = medgen::panics::catch(|| -> u32 { panic!("expected by the caller") }).unwrap_err();
            println!("caught: {e}");
            assert_eq!(medgen::panics::catch(|| 5).unwrap(), 5);
        }
        other => panic!("unknown scenario {other}"),
    }
    true
}

fn run(scenario: &str, backtrace: bool) -> Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "scenarios", "--nocapture", "--test-threads=1"]).env(SCENARIO, scenario);
    cmd.env("RUST_BACKTRACE", if backtrace { "1" } else { "0" }).env_remove("RUST_LIB_BACKTRACE");
    cmd.output().unwrap()
}

/// The entry point of the children; a no-op in a normal run.
#[test]
fn scenarios() {
    child_scenario();
}

fn internal_error_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr).lines().filter(|l| l.contains("internal error at")).map(String::from).collect()
}

#[test]
fn a_panic_is_one_line_and_exit_70() {
    for (scenario, msg) in [
        ("main", "boom on the main thread"),
        ("worker", "boom in a worker"),
        ("detached", "boom in a background thread"),
    ] {
        let t = std::time::Instant::now();
        let o = run(scenario, false);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(medgen::panics::EXIT_INTERNAL), "{scenario}: {:?}\n{err}", o.status);
        assert!(t.elapsed().as_secs() < 30, "{scenario}: the process waited for the panicked thread");
        let lines = internal_error_lines(&o);
        assert_eq!(lines.len(), 1, "{scenario}: {err}");
        let file = file!();
        assert!(
            lines[0].starts_with(&format!("internal error at {file}:"))
                && lines[0].ends_with(&format!("{msg}, please report")),
            "{scenario}: {}",
            lines[0]
        );
        assert!(!err.contains("stack backtrace") && !err.contains("panicked at"), "{scenario}: {err}");
    }
}

#[test]
fn rust_backtrace_adds_the_backtrace() {
    let o = run("main", true);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(medgen::panics::EXIT_INTERNAL), "{err}");
    assert_eq!(internal_error_lines(&o).len(), 1, "{err}");
    assert!(err.contains("child_scenario"), "no backtrace naming the panicking function:\n{err}");
}

#[test]
fn a_caught_panic_is_an_error_and_prints_nothing() {
    let o = run("caught", false);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{:?}\n{out}\n{err}", o.status);
    let file = file!();
    assert!(
        out.contains(&format!("caught: internal error at {file}:")) && out.contains("expected by the caller"),
        "{out}"
    );
    assert!(!err.contains("expected by the caller"), "the hook printed a caught panic:\n{err}");
}

/// The binary documents the exit code.
#[test]
fn help_documents_the_exit_codes() {
    let o = common::run::medgen(&["--help"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("70 on an internal error"), "{out}");
}

//! A process whose threads keep creating and joining short-lived threads
//! while it is dumped (tests/fixtures/threads_race.c): the dump must
//! succeed, or fail blaming a vanished thread and be retried (at most 3
//! times), and the restored process must go on making threads and pass.

#[macro_use]
mod common;

use common::Fixture;

/// Whether a failed dump blames a thread that went away under it (the one
/// failure a process making and reaping threads may legitimately cause).
fn blames_vanished_thread(run: &common::ToolRun) -> bool {
    // Only the error report counts, not tracing log lines (which start
    // with a timestamp): a WARN about a detach that found no process is not
    // the reason the dump failed.
    let plain = common::strip_ansi(&run.stderr).to_lowercase();
    plain
        .lines()
        .filter(|l| !l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .any(|l| {
            ["vanish", "no such process", "exited", "gone", "disappeared"]
                .iter()
                .any(|w| l.contains(w))
        })
}

/// Like common::assert_running_untraced, for a process whose threads come
/// and go: a thread that exits between the listing and the read is skipped.
fn assert_churning_untraced(pid: u32) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("process {pid} is gone: {e}"));
    for task in tasks.flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
            continue;
        };
        let get = |f: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(f))
                .unwrap_or("")
                .trim()
                .to_owned()
        };
        let state = get("State:");
        assert!(
            !state.starts_with('T') && !state.starts_with('t'),
            "thread {tid} of {pid} is in state {state}"
        );
        assert_eq!(
            get("TracerPid:"),
            "0",
            "thread {tid} of {pid} is still traced"
        );
    }
}

/// `cryopod dump -t PID -D img extra...` until it succeeds; a failure is
/// allowed only if it blames a vanished thread, at most 3 times, and must
/// leave the process running untraced.
fn dump_with_retries(fx: &Fixture, img: &std::path::Path, extra: &[&str]) {
    let pid = fx.pid.to_string();
    let mut attempts = Vec::new();
    loop {
        let _ = std::fs::remove_dir_all(img);
        let mut args = vec!["dump", "-t", &pid, "-D", img.to_str().unwrap()];
        args.extend_from_slice(extra);
        let run = common::cryopod(fx.log_dir(), &args);
        if run.status.success() {
            break;
        }
        assert!(
            blames_vanished_thread(&run) && attempts.len() < 3,
            "dump failed (earlier failed attempts: {}):\n{}\nfixture output:\n{}",
            attempts.len(),
            run.describe(),
            fx.output()
        );
        assert_churning_untraced(fx.pid);
        attempts.push(run.describe());
    }
    if !attempts.is_empty() {
        eprintln!(
            "dump retried {} times:\n{}",
            attempts.len(),
            attempts.join("\n")
        );
    }
}

// Threads created and joined all the time while the dump runs: the dump
// must succeed (at most 3 retries if it blames a vanished thread) and the
// restored process goes on making threads.
fn threads_race(w: common::Width, detached: bool) {
    let mut fx = Fixture::start("threads_race", w, &[]);
    let img = fx.img();
    dump_with_retries(&fx, &img, &[]);
    fx.reap_killed();
    if detached {
        fx.restore_detached();
        assert_churning_untraced(fx.pid);
    } else {
        fx.restore();
    }
    fx.go();
    fx.expect_pass();
}

both_widths!(threads_race, |w| threads_race(w, false));
both_widths!(threads_race_detached, |w| threads_race(w, true));

// One dump meets the race only now and then: fifty dumps that leave the
// process running (-R) make a mishandled thread exit all but certain to
// show, then a last dump and restore.
both_widths!(fifty_dumps_while_threads_churn, |w| {
    let mut fx = Fixture::start("threads_race", w, &[]);
    for i in 0..50 {
        let img = fx.dir.join(&format!("img-{i}"));
        dump_with_retries(&fx, &img, &["-R"]);
        let _ = std::fs::remove_dir_all(&img);
        assert_churning_untraced(fx.pid);
    }
    let img = fx.img();
    dump_with_retries(&fx, &img, &[]);
    fx.reap_killed();
    fx.restore();
    fx.go();
    fx.expect_pass();
});

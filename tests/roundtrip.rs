//! Dump and restore of each fixture, in both widths. Each fixture checks its
//! own state after restore against what it recorded before the dump; the
//! `*_detached` variants also compare /proc/PID from outside.

#[macro_use]
mod common;

use common::{Fixture, ProcView, kill, round_trip, round_trip_detached};

both_widths!(memory, |w| round_trip("memory", w, &[]));
both_widths!(memory_detached, |w| {
    round_trip_detached("memory", w, &[])
});
both_widths!(registers, |w| round_trip("registers", w, &[]));
both_widths!(signals, |w| round_trip("signals", w, &[]));
both_widths!(signals_detached, |w| {
    round_trip_detached("signals", w, &[])
});
both_widths!(files, |w| round_trip("files", w, &[]));
both_widths!(files_detached, |w| round_trip_detached("files", w, &[]));
both_widths!(ldt, |w| round_trip("ldt", w, &[]));
both_widths!(threads, |w| round_trip("threads", w, &[]));
both_widths!(threads_detached, |w| {
    round_trip_detached("threads", w, &[])
});
both_widths!(modeswitch, |w| round_trip("modeswitch", w, &[]));
both_widths!(modeswitch_threads, |w| round_trip(
    "modeswitch_threads",
    w,
    &[]
));
both_widths!(modeswitch_detached, |w| {
    round_trip_detached("modeswitch", w, &[])
});

/// Starts the syscall fixture in `mode` and dumps it once it sleeps in the
/// kernel.
fn dump_while_asleep(w: common::Width, mode: &str) -> Fixture {
    let mut fx = Fixture::start("syscall", w, &[mode]);
    let asleep = common::wait_for(std::time::Duration::from_secs(5), || {
        common::proc_state(fx.pid) == Some('S')
    });
    assert!(asleep, "the fixture never went to sleep in {mode}");
    fx.dump(&[]);
    fx
}

fn syscall_round_trip(w: common::Width, mode: &str) {
    let mut fx = dump_while_asleep(w, mode);
    fx.restore();
    fx.go();
    fx.expect_pass();
}

both_widths!(syscall_nanosleep, |w| syscall_round_trip(w, "nanosleep"));
both_widths!(syscall_ppoll, |w| syscall_round_trip(w, "ppoll"));
both_widths!(syscall_usleep, |w| syscall_round_trip(w, "usleep"));

// sigsuspend waits for a signal, which can only be sent once the restored
// process exists: restore with -d, compare it from outside, then signal it.
both_widths!(syscall_sigsuspend, |w| {
    let mut fx = Fixture::start("syscall", w, &["sigsuspend"]);
    assert!(
        common::wait_for(std::time::Duration::from_secs(5), || {
            common::proc_state(fx.pid) == Some('S')
        }),
        "the fixture never went to sleep in sigsuspend"
    );
    let before = ProcView::take(fx.pid);
    fx.dump(&[]);
    fx.restore_detached();
    // The mask that sigsuspend installed while waiting must be back too.
    before.assert_same(&ProcView::take(fx.pid));
    fx.go();
    kill(fx.pid, libc::SIGUSR1);
    fx.expect_pass();
});

/// Per-thread signal state of every task of `pid`, as /proc shows it:
/// (tid, SigBlk, SigPnd) sorted by tid.
fn task_signals(pid: u32) -> Vec<(u32, String, String)> {
    let mut tasks: Vec<(u32, String, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}"))
        .map(|e| {
            let tid: u32 = e.unwrap().file_name().to_string_lossy().parse().unwrap();
            let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
                .unwrap_or_default();
            let get = |f: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(f))
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            };
            (tid, get("SigBlk:"), get("SigPnd:"))
        })
        .collect();
    tasks.sort();
    tasks
}

// Four threads with their own TLS, masks, pending signals, altstacks,
// registers, robust lists and rseq; see tests/fixtures/threads_state.c.
both_widths!(threads_state, |w| round_trip("threads_state", w, &[]));
both_widths!(threads_state_detached, |w| {
    let mut fx = Fixture::start("threads_state", w, &[]);
    let before = ProcView::take(fx.pid);
    let tasks_before = task_signals(fx.pid);
    assert_eq!(
        tasks_before.len(),
        5,
        "expected 5 threads: {tasks_before:?}"
    );
    fx.dump(&[]);
    fx.restore_detached();
    before.assert_same(&ProcView::take(fx.pid));
    assert_eq!(
        tasks_before,
        task_signals(fx.pid),
        "threads (tid, SigBlk, SigPnd) before and after the restore differ"
    );
    fx.go();
    fx.expect_pass();
});

// A process group and a session whose leaders are gone (see the fixture).
// B and M are reparented to init when the dump kills the root, so the
// restore waits until init has reaped them too.
both_widths!(orphan_group, |w| {
    let mut fx = Fixture::start("orphan_group", w, &[]);
    fx.dump(&[]);
    let img = fx.img();
    let show = common::cryopod(fx.log_dir(), &["show", img.to_str().unwrap()]);
    show.assert_ok();
    let json: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let tasks = json["inventory"]["tasks"].as_array().unwrap().clone();
    assert_eq!(tasks.len(), 3, "the image holds the root, B and M");
    for t in tasks {
        let pid = t.as_u64().unwrap() as u32;
        let free = common::wait_for(std::time::Duration::from_secs(15), || {
            !common::pid_exists(pid)
        });
        assert!(free, "pid {pid} still in use");
    }
    fx.restore();
    fx.go();
    fx.expect_pass();
});

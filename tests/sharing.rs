//! What processes share: memory that a parent and its forked workers share
//! copy-on-write stays shared after restore (the tree's proportional set
//! size, Pss, which splits shared pages between their sharers, must not
//! grow); and sockets, pipes and an open file shared by a parent and its
//! child, of the same or the other width, come back with their data.

#[macro_use]
mod common;

use std::fs;
use std::time::Duration;

use common::{Fixture, pid_exists, wait_for};

/// `pid` and its children (the fixture's tree is two levels deep).
fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let children =
        fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    out.extend(
        children
            .split_whitespace()
            .filter_map(|s| s.parse::<u32>().ok()),
    );
    out
}

/// Pss of the tree in KiB, from /proc/PID/smaps_rollup.
fn pss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|p| {
            let text = fs::read_to_string(format!("/proc/{p}/smaps_rollup")).unwrap_or_default();
            text.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no Pss for pid {p}"))
        })
        .sum()
}

both_widths!(cow_sharing_survives, |w| {
    let mut fx = Fixture::start("cow_workers", w, &[]);
    let before_pids = tree(fx.pid);
    assert_eq!(before_pids.len(), 4, "the parent and three workers");
    let before = pss_kib(&before_pids);
    fx.dump(&[]);
    for p in &before_pids {
        assert!(
            wait_for(Duration::from_secs(15), || !pid_exists(*p)),
            "pid {p} still in use"
        );
    }
    fx.restore_detached();
    let after_pids = tree(fx.pid);
    assert_eq!(after_pids, before_pids, "the same tree came back");
    let after = pss_kib(&after_pids);
    println!("Pss of the tree: {before} KiB before the dump, {after} KiB after restore");
    // Without sharing the 32 MiB would count four times (+96 MiB); allow
    // a little for page tables and the workers' own pages.
    assert!(
        after <= before + 4 * 1024,
        "Pss grew from {before} KiB to {after} KiB: copy-on-write sharing was lost"
    );
    fx.go();
    fx.expect_pass();
});

/// Dumps the ipc fixture (parent and child, the child of the same or the
/// other width), waits until both pids are free, restores and lets it check
/// what was in flight.
fn ipc(w: common::Width, child: &str) {
    // The child may exec the other width's build: have both.
    common::fixture("ipc", common::Width::W64);
    common::fixture("ipc", common::Width::W32);
    let mut fx = Fixture::start("ipc", w, &[child]);
    let pids = tree(fx.pid);
    assert_eq!(pids.len(), 2, "the parent and its child");
    fx.dump(&[]);
    for p in &pids {
        assert!(
            wait_for(Duration::from_secs(15), || !pid_exists(*p)),
            "pid {p} still in use"
        );
    }
    fx.restore();
    fx.go();
    fx.expect_pass();
}

both_widths!(ipc_same_width, |w| ipc(w, "same"));
both_widths!(ipc_other_width, |w| ipc(w, "other"));

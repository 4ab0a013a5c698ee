//! Process trees: `cryopod dump -t ROOT` takes the root and every
//! descendant; restore recreates each with its pid, parent, process group
//! and session, unreaped zombies, and shared anonymous memory inherited
//! over fork still shared. Trees mix widths by exec of the other width's
//! build (tests/fixtures/tree.c).

#[allow(unused_macros)]
mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    Fixture, TestDir, Width, assert_consecutive, count_lines, kill, pid_exists, read_counter,
    spawn_restore, wait_for, wait_timeout,
};

/// Every descendant of `root` (children of every thread, recursively), in
/// pre-order, root first.
fn tree_pids(root: u32) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let pid = out[i];
        if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let path = task.path().join("children");
                for c in fs::read_to_string(path)
                    .unwrap_or_default()
                    .split_whitespace()
                {
                    out.push(c.parse().unwrap());
                }
            }
        }
        i += 1;
    }
    out
}

/// The pids an image holds (`cryopod show`: inventory.tasks, root first).
fn image_pids(log_dir: &Path, img: &Path) -> Vec<u32> {
    let run = common::cryopod(log_dir, &["show", img.to_str().unwrap()]);
    run.assert_ok();
    let json: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("cryopod show printed no JSON ({e}):\n{}", run.stdout));
    json["inventory"]["tasks"]
        .as_array()
        .unwrap_or_else(|| panic!("no inventory.tasks in:\n{}", run.stdout))
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

/// What the tree looks like from outside, for one process.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Node {
    ppid: String,
    nspid: String,
    pgrp: String,
    session: String,
    zombie: bool,
    exe: Option<PathBuf>,
    threads: usize,
}

fn node(pid: u32) -> Node {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // Fields after "(comm) ": state ppid pgrp session ...
    let rest: Vec<&str> = stat
        .rsplit_once(") ")
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    Node {
        ppid: common::status_field(pid, "PPid").unwrap_or_default(),
        nspid: common::status_field(pid, "NSpid").unwrap_or_default(),
        pgrp: rest[2].to_owned(),
        session: rest[3].to_owned(),
        zombie: rest[0] == "Z",
        exe: fs::read_link(format!("/proc/{pid}/exe")).ok(),
        threads: fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count()),
    }
}

fn tree_view(root: u32) -> BTreeMap<u32, Node> {
    tree_pids(root).into_iter().map(|p| (p, node(p))).collect()
}

/// Kills, when dropped, every process of a tree recorded earlier that
/// still runs one of the given executables (the pids of a restored tree are
/// the same, and a pid reused by something else is left alone).
struct TreeGuard {
    pids: Vec<u32>,
    exes: Vec<PathBuf>,
}

impl TreeGuard {
    fn kill_all(&self) {
        for &pid in &self.pids {
            if let Ok(exe) = fs::read_link(format!("/proc/{pid}/exe"))
                && self.exes.contains(&exe)
            {
                kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Waits until none of `pids` exists any more (an orphaned zombie is
/// reaped by init), so the restore finds them free.
fn wait_all_gone(pids: &[u32]) {
    let gone = wait_for(Duration::from_secs(10), || {
        pids.iter().all(|p| !pid_exists(*p))
    });
    let left: Vec<String> = pids
        .iter()
        .filter(|p| pid_exists(**p))
        .map(|p| format!("{p} {:?}", common::proc_state(*p)))
        .collect();
    assert!(gone, "processes of the dumped tree still exist: {left:?}");
}

fn width_of(bits: &str) -> Width {
    match bits {
        "64" => Width::W64,
        "32" => Width::W32,
        _ => panic!("bad width {bits}"),
    }
}

/// Starts the tree fixture for `shape` and checks it is a whole tree:
/// per level a node, a helper and a zombie.
fn start_tree(shape: &str) -> (Fixture, TreeGuard, BTreeMap<u32, Node>) {
    let exes = vec![
        common::fixture("tree", Width::W64),
        common::fixture("tree", Width::W32),
    ];
    let root_width = width_of(shape.split(',').next().unwrap().trim_end_matches('t'));
    let fx = Fixture::start("tree", root_width, &[shape]);
    let view = tree_view(fx.pid);
    let guard = TreeGuard {
        pids: view.keys().copied().collect(),
        exes,
    };
    let levels = shape.split(',').count();
    assert_eq!(
        view.len(),
        3 * levels,
        "expected {} processes for shape {shape}: {view:#?}",
        3 * levels
    );
    assert_eq!(view.values().filter(|n| n.zombie).count(), levels);
    assert_eq!(
        view.values().filter(|n| n.threads == 2).count(),
        shape.matches('t').count(),
        "threaded nodes of {shape}: {view:#?}"
    );
    (fx, guard, view)
}

fn tree_round_trip(shape: &str) {
    let (mut fx, guard, before) = start_tree(shape);
    fx.dump(&[]);
    wait_all_gone(&guard.pids);
    fx.restore();
    // Every process is back (restore runs the tree under the attached
    // command): same pids, parents, groups, sessions, zombies.
    let back = wait_for(Duration::from_secs(10), || {
        guard.pids.iter().all(|p| pid_exists(*p))
    });
    assert!(
        back,
        "not every process of the tree came back: {:?}\n{}",
        guard
            .pids
            .iter()
            .filter(|p| !pid_exists(**p))
            .collect::<Vec<_>>(),
        common::restore_log(fx.log_dir())
    );
    fx.go();
    fx.expect_pass();
    drop(before);
}

fn tree_round_trip_detached(shape: &str) {
    let (mut fx, guard, before) = start_tree(shape);
    fx.dump(&[]);
    wait_all_gone(&guard.pids);
    fx.restore_detached();
    let after = tree_view(fx.pid);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the restored tree has other pids\nbefore: {before:#?}\nafter: {after:#?}"
    );
    for (pid, b) in &before {
        let mut a = after[pid].clone();
        if *pid == fx.pid {
            // The root's parent is whoever restored it.
            a.ppid = b.ppid.clone();
        }
        assert_eq!(*b, a, "pid {pid} differs after the restore");
    }
    fx.go();
    fx.expect_pass();
}

macro_rules! tree_tests {
    ($name:ident, $shape:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn attached() {
                tree_round_trip($shape);
            }
            #[test]
            fn detached() {
                tree_round_trip_detached($shape);
            }
        }
    };
}

tree_tests!(tree_64_32_64, "64,32,64");
tree_tests!(tree_32_64_32, "32,64,32");
tree_tests!(tree_64_64, "64,64");
tree_tests!(tree_32_32, "32,32");
// "t": that process runs a second thread too.
tree_tests!(tree_threaded_64_32_64, "64t,32t,64t");

// busybox sh (i386) forking `busybox sleep` on each iteration: the dump
// takes the shell and whichever child it has at that moment; after the
// restore the count goes on with no gap and no repeat.
#[test]
fn busybox_sh_forking_32bit() {
    let busybox = Path::new("/bin/busybox");
    let dir = TestDir::new("busybox-tree");
    let script = "i=0; while :; do i=$((i+1)); echo $i >> out; busybox sleep 0.05; done";
    let log = File::create(dir.join("log")).unwrap();
    let mut child = common::only_std_fds(Command::new(busybox).args(["sh", "-c", script]))
        .current_dir(&dir.path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start busybox (scripts/setup.sh)");
    let pid = child.id();
    let mut guard = TreeGuard {
        pids: vec![pid],
        exes: vec![fs::canonicalize(busybox).unwrap()],
    };
    let counter = dir.join("out");
    assert!(
        wait_for(Duration::from_secs(20), || count_lines(&counter) >= 5),
        "busybox never counted to 5; log:\n{}",
        fs::read_to_string(dir.join("log")).unwrap_or_default()
    );
    let img = dir.join("img");
    // Dump while the shell has a child (it has one but for the moment
    // between two `busybox sleep`s).
    assert!(
        wait_for(Duration::from_secs(5), || tree_pids(pid).len() > 1),
        "busybox sh never had a child"
    );
    let run = common::cryopod(
        &dir.path,
        &["dump", "-t", &pid.to_string(), "-D", img.to_str().unwrap()],
    );
    run.assert_ok();
    let status = wait_timeout(&mut child, Duration::from_secs(10)).expect("still alive");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "not killed by the dump"
    );
    let at_dump = read_counter(&counter);
    assert_consecutive("before the dump", &at_dump, 1);
    // The processes in the image must be gone (reaped by init) before the
    // restore asks for their pids again.
    let dumped = image_pids(&dir.path, &img);
    assert_eq!(dumped[0], pid, "the image's first task is not the shell");
    if dumped.len() < 2 {
        common::skip("busybox tree: the dump caught the shell between two children this time");
    }
    wait_all_gone(&dumped);

    let mut restore = spawn_restore(&dir.path, &img);
    let grew = wait_for(Duration::from_secs(20), || {
        count_lines(&counter) >= at_dump.len() + 5
    });
    guard.pids = tree_pids(pid);
    guard.kill_all();
    let status = wait_timeout(&mut restore, Duration::from_secs(10));
    let log = common::restore_log(&dir.path);
    assert!(grew, "the restored shell did not count on\n{log}");
    assert_eq!(
        status.map(common::exit_code),
        Some(128 + libc::SIGKILL),
        "restore should report the SIGKILL we sent\n{log}"
    );
    assert_consecutive("across the restore", &read_counter(&counter), 1);
}

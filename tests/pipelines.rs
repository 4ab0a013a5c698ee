//! Real process trees joined by pipes, dumped mid-run: a busybox (i386)
//! shell pipeline and a python3 multiprocessing pool. Each appends a
//! running counter to a file; after restore it must go on with no gap and
//! no repeat, which needs every process back, the pipes between them and
//! the data that was buffered in them.

#[allow(unused_macros)]
#[macro_use]
mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use common::{
    TestDir, assert_consecutive, count_lines, kill, pid_exists, read_counter, spawn_restore,
    wait_for, wait_timeout,
};

/// `pid` and all its descendants.
fn tree_of(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let children = fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(
                    children
                        .split_whitespace()
                        .filter_map(|s| s.parse::<u32>().ok()),
                );
            }
        }
        i += 1;
    }
    out
}

/// Every pid (processes and zombies) the image in `img` holds.
fn image_pids(dir: &TestDir, img: &Path) -> Vec<u32> {
    let show = common::cryopod(&dir.path, &["show", img.to_str().unwrap()]);
    show.assert_ok();
    let json: serde_json::Value = serde_json::from_str(&show.stdout).unwrap();
    let inv = &json["inventory"];
    let mut pids: Vec<u32> = inv["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_u64().unwrap() as u32)
        .collect();
    pids.extend(
        inv["zombies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|z| z["pid"].as_u64().unwrap() as u32),
    );
    pids
}

/// Dumps the tree rooted at `child` once `counter` has a few lines,
/// restores it, lets it count on, kills it and checks the sequence.
fn dump_restore_tree(dir: &TestDir, mut child: Child, counter: &Path, min_processes: usize) {
    let pid = child.id();
    assert!(
        wait_for(Duration::from_secs(30), || count_lines(counter) >= 5),
        "the program never counted to 5; log:\n{}",
        fs::read_to_string(dir.join("log")).unwrap_or_default()
    );
    let before = tree_of(pid);
    let img = dir.join("img");
    common::cryopod(
        &dir.path,
        &["dump", "-t", &pid.to_string(), "-D", img.to_str().unwrap()],
    )
    .assert_ok();
    let status = wait_timeout(&mut child, Duration::from_secs(10)).expect("still alive");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "not killed by the dump"
    );
    let pids = image_pids(dir, &img);
    assert!(
        pids.len() >= min_processes,
        "the image holds {pids:?}, the tree was {before:?}"
    );
    // The killed children are reaped by init, which takes its time.
    for p in &pids {
        let free = wait_for(Duration::from_secs(15), || !pid_exists(*p));
        assert!(free, "pid {p} still in use");
    }
    let at_dump = read_counter(counter);
    let mut restore = spawn_restore(&dir.path, &img);
    let grew = wait_for(Duration::from_secs(30), || {
        count_lines(counter) >= at_dump.len() + 20
    });
    let after = tree_of(pid);
    for p in after.iter().rev() {
        kill(*p, libc::SIGKILL);
    }
    let status = wait_timeout(&mut restore, Duration::from_secs(10));
    let log = common::restore_log(&dir.path);
    assert!(grew, "the restored tree did not count on\n{log}");
    assert_eq!(
        status.map(common::exit_code),
        Some(128 + libc::SIGKILL),
        "{log}"
    );
    // Short-lived processes of the image (a busybox applet forked per line)
    // may be gone by now; the root must be back, with the dumped pid.
    assert_eq!(after.first(), Some(&pid), "{log}");
    let all = read_counter(counter);
    assert_consecutive("across the restore", &all, all[0]);
}

#[test]
fn busybox_pipeline_32bit() {
    let dir = TestDir::new("busybox-pipeline");
    // seq runs far ahead and fills the pipe, so the dump finds data
    // buffered in it; the reading loop must see every number once.
    let script =
        "busybox seq 1 1000000 | while read i; do echo $i >> out; busybox usleep 2000; done";
    let child = common::start_in(
        &dir,
        Command::new("/bin/busybox").args(["sh", "-c", script]),
    );
    dump_restore_tree(&dir, child, &dir.join("out"), 3);
}

#[test]
fn python3_multiprocessing_pool() {
    let dir = TestDir::new("python-pool");
    let script = "import multiprocessing as mp, time\n\
                  def work(x):\n    time.sleep(0.005)\n    return x\n\
                  if __name__ == '__main__':\n    \
                      with mp.Pool(3) as pool:\n        \
                          i = 1\n        \
                          while True:\n            \
                              res = pool.map(work, range(i, i + 3))\n            \
                              with open('out', 'a') as f:\n                \
                                  f.write(''.join(f'{r}\\n' for r in res))\n            \
                              i += 3\n            \
                              time.sleep(0.02)\n";
    let child = common::start_in(&dir, Command::new("/usr/bin/python3").args(["-c", script]));
    dump_restore_tree(&dir, child, &dir.join("out"), 4);
}

#[test]
fn busybox_fifo_32bit() {
    let dir = TestDir::new("busybox-fifo");
    // A named pipe between two processes, filled ahead of the reader.
    let script = "busybox mkfifo f; busybox seq 1 1000000 > f & \
                  while read i; do echo $i >> out; busybox usleep 2000; done < f";
    let child = common::start_in(
        &dir,
        Command::new("/bin/busybox").args(["sh", "-c", script]),
    );
    dump_restore_tree(&dir, child, &dir.join("out"), 2);
}

/// A parent feeding numbers to its child over a unix socket pair faster
/// than the child reads them, so messages are queued when it is dumped.
fn python_socketpair(kind: &str) {
    let dir = TestDir::new(&format!("python-socketpair-{kind}"));
    let script = "import os, socket, sys, time\n\
                  kind = socket.SOCK_SEQPACKET if sys.argv[1] == 'seqpacket' else socket.SOCK_STREAM\n\
                  a, b = socket.socketpair(socket.AF_UNIX, kind)\n\
                  if os.fork() == 0:\n    \
                      a.close()\n    \
                      f = b.makefile('rb') if kind == socket.SOCK_STREAM else None\n    \
                      while True:\n        \
                          line = f.readline() if f else b.recv(64)\n        \
                          with open('out', 'a') as out:\n            \
                              out.write(line.decode().strip() + '\\n')\n        \
                          time.sleep(0.004)\n\
                  else:\n    \
                      b.close()\n    \
                      i = 1\n    \
                      while True:\n        \
                          a.send(b'%d\\n' % i)\n        \
                          i += 1\n        \
                          time.sleep(0.001 if i < 400 else 0.004)\n";
    let child = common::start_in(
        &dir,
        Command::new("/usr/bin/python3").args(["-c", script, kind]),
    );
    dump_restore_tree(&dir, child, &dir.join("out"), 2);
}

#[test]
fn python3_socketpair_stream() {
    python_socketpair("stream");
}

#[test]
fn python3_socketpair_seqpacket() {
    python_socketpair("seqpacket");
}

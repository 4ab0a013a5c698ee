//! Real programs dumped mid-run: each appends a running counter to a file,
//! so after restore the file must go on with no gap and no repeat.

#[macro_use]
mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use common::{
    Fixture, TestDir, assert_consecutive, count_lines, kill, pid_exists, read_counter,
    spawn_restore, wait_for, wait_timeout,
};

/// Dumps the program writing `counter` once it has counted a few lines,
/// restores it, lets it count on, kills it and checks the sequence.
fn dump_restore_counting(dir: &TestDir, mut child: Child, counter: &Path) {
    let pid = child.id();
    assert!(
        wait_for(Duration::from_secs(20), || count_lines(counter) >= 5),
        "the program never counted to 5; log:\n{}",
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    );
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
    let at_dump = read_counter(counter);
    assert_consecutive("before the dump", &at_dump, 1);

    assert!(!pid_exists(pid));
    let mut restore = spawn_restore(&dir.path, &img);
    let grew = wait_for(Duration::from_secs(20), || {
        count_lines(counter) >= at_dump.len() + 5
    });
    kill(pid, libc::SIGKILL);
    let status = wait_timeout(&mut restore, Duration::from_secs(10));
    let log = common::restore_log(&dir.path);
    assert!(grew, "the restored program did not count on\n{log}");
    assert_eq!(
        status.map(common::exit_code),
        Some(128 + libc::SIGKILL),
        "restore should report the SIGKILL we sent\n{log}"
    );
    let all = read_counter(counter);
    assert_consecutive("across the restore", &all, 1);
}

#[test]
fn busybox_sh_32bit() {
    let busybox = Path::new("/bin/busybox");
    let file = Command::new("file")
        .arg("-L")
        .arg(busybox)
        .output()
        .expect("run file (scripts/setup.sh installs it)");
    let kind = String::from_utf8_lossy(&file.stdout);
    assert!(
        kind.contains("ELF 32-bit"),
        "/bin/busybox must be the i386 build (busybox:i386, scripts/setup.sh): {kind}"
    );
    let dir = TestDir::new("busybox");
    // No `sleep`: busybox sh would fork /usr/bin/sleep, and process trees
    // are not supported yet. A builtin busy loop paces the counter instead.
    let script = "i=0; while :; do i=$((i+1)); echo $i >> out; \
                  j=0; while [ $j -lt 20000 ]; do j=$((j+1)); done; done";
    let child = common::start_in(&dir, Command::new(busybox).args(["sh", "-c", script]));
    dump_restore_counting(&dir, child, &dir.join("out"));
}

#[test]
fn python3_64bit() {
    let dir = TestDir::new("python");
    let script = "import time\n\
                  i = 0\n\
                  while True:\n    \
                      i += 1\n    \
                      with open('out', 'a') as f:\n        \
                          f.write(f'{i}\\n')\n    \
                      time.sleep(0.05)\n";
    let child = common::start_in(&dir, Command::new("/usr/bin/python3").args(["-c", script]));
    dump_restore_counting(&dir, child, &dir.join("out"));
}

both_widths!(counter, |w| {
    let dir = TestDir::new(&format!("counter-{}", w.bits()));
    let counter = dir.join("out");
    let exe = common::fixture("counter", w);
    let child = common::start_in(&dir, Command::new(exe).arg(&counter).arg("20"));
    dump_restore_counting(&dir, child, &counter);
});

// The memory fixture under a restore that returns at once (-d), with the
// same outside checks as in roundtrip.rs, to show the reparented process
// keeps running on its own.
both_widths!(detached_process_runs_on, |w| {
    let mut fx = Fixture::start("memory", w, &[]);
    fx.dump(&[]);
    fx.restore_detached();
    assert_eq!(
        common::status_field(fx.pid, "PPid").as_deref(),
        Some("1"),
        "a -d restored process should be reparented to init"
    );
    fx.go();
    fx.expect_pass();
});

// python3 with three `threading` threads, each counting into a file of its
// own every 20 ms while the main thread waits in join: every thread's
// sequence must go on after the restore with no gap and no repeat.
#[test]
fn python3_threads_64bit() {
    let dir = TestDir::new("python-threads");
    let script = "import threading, time\n\
                  def count(n):\n    \
                      i = 0\n    \
                      while True:\n        \
                          i += 1\n        \
                          with open(f'out{n}', 'a') as f:\n            \
                              f.write(f'{i}\\n')\n        \
                          time.sleep(0.02)\n\
                  ts = [threading.Thread(target=count, args=(n,)) for n in range(3)]\n\
                  for t in ts:\n    \
                      t.start()\n\
                  for t in ts:\n    \
                      t.join()\n";
    let mut child = common::start_in(&dir, Command::new("/usr/bin/python3").args(["-c", script]));
    let pid = child.id();
    let files: Vec<_> = (0..3).map(|n| dir.join(&format!("out{n}"))).collect();
    assert!(
        wait_for(Duration::from_secs(20), || files
            .iter()
            .all(|f| count_lines(f) >= 5)),
        "the threads never counted to 5; log:\n{}",
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    );
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    assert_eq!(threads, 4, "python should run 4 threads");
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
    let at_dump: Vec<usize> = files
        .iter()
        .map(|f| {
            let nums = read_counter(f);
            assert_consecutive(&format!("{} before the dump", f.display()), &nums, 1);
            nums.len()
        })
        .collect();

    assert!(!pid_exists(pid));
    let mut restore = spawn_restore(&dir.path, &img);
    let grew = wait_for(Duration::from_secs(20), || {
        files
            .iter()
            .zip(&at_dump)
            .all(|(f, n)| count_lines(f) >= n + 10)
    });
    let threads_after = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0);
    kill(pid, libc::SIGKILL);
    let status = wait_timeout(&mut restore, Duration::from_secs(10));
    let log = common::restore_log(&dir.path);
    assert!(
        grew,
        "not every restored thread counted on (lines at dump {at_dump:?}, now {:?})\n{log}",
        files.iter().map(|f| count_lines(f)).collect::<Vec<_>>()
    );
    assert_eq!(
        threads_after, 4,
        "the restored python runs {threads_after} threads"
    );
    assert_eq!(
        status.map(common::exit_code),
        Some(128 + libc::SIGKILL),
        "restore should report the SIGKILL we sent\n{log}"
    );
    for f in &files {
        assert_consecutive(
            &format!("{} across the restore", f.display()),
            &read_counter(f),
            1,
        );
    }
}

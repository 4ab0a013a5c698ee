//! What the image leaves out and what cryopod refuses up front: pages a
//! process never touched are not saved; a kind of fd it cannot restore
//! (a TCP socket) stops the dump with the process left running; a pid in use stops the
//! restore with nothing made.

#[macro_use]
mod common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    Fixture, KillOnDrop, TestDir, assert_running_untraced, count_lines, cryopod, wait_for,
};

/// Size of the memory fixture's never-touched anonymous region.
const UNTOUCHED: u64 = 8 << 20;

both_widths!(untouched_pages_are_not_saved, |w| {
    let mut fx = Fixture::start("memory", w, &[]);
    fx.dump(&[]);
    let img = fx.img();
    let show = cryopod(fx.log_dir(), &["show", img.to_str().unwrap()]);
    show.assert_ok();
    let json: serde_json::Value = serde_json::from_str(&show.stdout).expect("show prints JSON");
    let task = &json["tasks"][0];
    // The untouched region may have merged with a neighbour, so count:
    // of all private anonymous memory, at least its size must be unsaved.
    let anon: Vec<(u64, u64)> = task["vmas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["kind"]["kind"] == "anon")
        .map(|v| (v["start"].as_u64().unwrap(), v["end"].as_u64().unwrap()))
        .collect();
    let anon_bytes: u64 = anon.iter().map(|(s, e)| e - s).sum();
    let saved_anon: u64 = task["pages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            let addr = r["addr"].as_u64().unwrap();
            anon.iter().any(|(s, e)| (*s..*e).contains(&addr))
        })
        .map(|r| r["pages"].as_u64().unwrap() * 4096)
        .sum();
    assert!(
        saved_anon + UNTOUCHED <= anon_bytes,
        "{saved_anon} bytes of {anon_bytes} of anonymous memory saved: the {UNTOUCHED}-byte untouched region was"
    );
    // The pages file holds what was touched, not the whole address space.
    let pages = fs::metadata(img.join(format!("pages-{}.img", fx.pid)))
        .unwrap()
        .len();
    let saved = task["page_count"].as_u64().unwrap();
    assert_eq!(
        pages,
        4096 * (saved + 1),
        "pages file size against page_count"
    );
    fx.restore();
    fx.go();
    fx.expect_pass();
});

both_widths!(dump_refuses_a_socket_and_leaves_the_process_running, |w| {
    let dir = TestDir::new(&format!("socket-fd-{}", w.bits()));
    let count = dir.join("count");
    let mut cmd = Command::new(common::fixture("counter", w));
    cmd.arg(&count)
        .arg("20")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: socket, dup2 and close_range are async-signal-safe; this runs
    // in the forked child just before exec and leaves a TCP socket on fd 5.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            let s = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            if s >= 0 {
                libc::dup2(s, 5);
                libc::close(s);
            }
            Ok(())
        });
    }
    let child = KillOnDrop(cmd.spawn().unwrap());
    let pid = child.0.id();
    assert!(wait_for(Duration::from_secs(10), || count_lines(&count) >= 3));
    let img = dir.join("img");
    let run = cryopod(
        &dir.path,
        &["dump", "-t", &pid.to_string(), "-D", img.to_str().unwrap()],
    );
    run.assert_clean_error(&[&pid.to_string(), "fd 5", "socket"]);
    assert_running_untraced(pid);
    let now = count_lines(&count);
    assert!(
        wait_for(Duration::from_secs(5), || count_lines(&count) >= now + 3),
        "the process stopped counting after the refused dump"
    );
    assert!(
        !img.join("inventory.img").exists(),
        "a refused dump left an image behind"
    );
});

both_widths!(restore_refuses_a_pid_in_use, |w| {
    let mut fx = Fixture::start("syscall", w, &["usleep"]);
    fx.dump(&["-R"]);
    // The original still runs with the pid the image wants.
    let img = fx.img();
    let run = cryopod(fx.log_dir(), &["restore", "-D", img.to_str().unwrap()]);
    run.assert_clean_error(&[&fx.pid.to_string(), "in use"]);
    assert_running_untraced(fx.pid);
    fx.kill_original();
});

both_widths!(restore_refuses_damaged_page_data, |w| {
    let mut fx = Fixture::start("memory", w, &[]);
    fx.dump(&[]);
    let pages = fx.img().join(format!("pages-{}.img", fx.pid));
    let mut bytes = fs::read(&pages).unwrap();
    // A byte of page data, past the 4096-byte header.
    let at = bytes.len() - 100;
    bytes[at] ^= 0x5a;
    fs::write(&pages, &bytes).unwrap();
    let img = fx.img();
    let run = cryopod(fx.log_dir(), &["restore", "-D", img.to_str().unwrap()]);
    run.assert_clean_error(&[&format!("pages-{}.img", fx.pid), "checksum"]);
    assert!(
        !common::pid_exists(fx.pid),
        "a refused restore left pid {} behind",
        fx.pid
    );
});

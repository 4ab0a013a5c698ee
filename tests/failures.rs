//! What cryopod must refuse, and how: a non-zero exit, one clear error
//! line, and nothing left stopped, traced or half-restored.

#[macro_use]
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{
    Fixture, KillOnDrop, TestDir, Width, assert_consecutive, assert_running_untraced, count_lines,
    cryopod, kill, pid_exists, read_counter, spawn_restore, status_field, wait_for, wait_timeout,
};

#[test]
fn dump_of_a_missing_pid() {
    let dir = TestDir::new("missing-pid");
    // A pid that existed a moment ago and is free now.
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let img = dir.join("img");
    let run = cryopod(
        &dir.path,
        &["dump", "-t", &pid.to_string(), "-D", img.to_str().unwrap()],
    );
    run.assert_clean_error(&[&pid.to_string()]);
    assert!(
        !img.join("inventory.img").exists(),
        "a failed dump left an image that looks complete"
    );
}

both_widths!(dump_of_a_traced_process, |w| {
    let mut fx = Fixture::start("syscall", w, &["usleep"]);
    let out = fs::File::create(fx.dir.join("tracer.out")).unwrap();
    // Dropped before `fx`: a traced child cannot be reaped while its
    // tracer lives.
    let mut tracer = KillOnDrop(
        Command::new(common::fixture("tracer", Width::W64))
            .arg(fx.pid.to_string())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    );
    let tracing = wait_for(Duration::from_secs(5), || {
        fs::read_to_string(fx.dir.join("tracer.out")).is_ok_and(|s| s.contains("TRACING"))
    });
    assert!(tracing, "the tracer fixture could not seize the process");

    let img = fx.img();
    let run = cryopod(
        fx.log_dir(),
        &[
            "dump",
            "-t",
            &fx.pid.to_string(),
            "-D",
            img.to_str().unwrap(),
        ],
    );
    run.assert_clean_error(&[&fx.pid.to_string()]);
    // Still running, and still traced by our tracer, not by cryopod.
    let state = status_field(fx.pid, "State").unwrap_or_default();
    assert!(
        !state.starts_with('T') && !state.starts_with('t'),
        "the process is left in state {state}"
    );
    assert_eq!(
        status_field(fx.pid, "TracerPid"),
        Some(tracer.0.id().to_string()),
        "the tracer changed"
    );
    tracer.0.kill().unwrap();
    tracer.0.wait().unwrap();
    assert!(
        wait_for(Duration::from_secs(2), || status_field(fx.pid, "TracerPid")
            .as_deref()
            == Some("0")),
        "still traced after the tracer died"
    );
    assert_running_untraced(fx.pid);
    fx.go();
    fx.expect_pass();
});

#[test]
fn restore_from_a_missing_dir() {
    let dir = TestDir::new("missing-dir");
    let img = dir.join("no-such-image");
    let run = cryopod(&dir.path, &["restore", "-D", img.to_str().unwrap()]);
    run.assert_clean_error(&["no-such-image"]);
}

/// Processes whose command line mentions `needle` (the fixture's unique
/// work dir), other than `except`.
fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.to_string_lossy().into_owned();
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

const META_MAGIC: &[u8] = b"CRYOPOD\n";
const PAGES_MAGIC: &[u8] = b"CRYOPAGE";

#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Flip a byte in the middle of a metadata file's payload.
    FlipByte,
    /// Cut the file to half its length.
    Truncate,
    /// Bump the format version (u32 at offset 8 in every header).
    NextVersion,
}

fn damage(path: &Path, how: Damage) {
    let mut bytes = fs::read(path).unwrap();
    match how {
        Damage::FlipByte => {
            let at = 32 + (bytes.len() - 32) / 2;
            bytes[at] ^= 0x01;
        }
        Damage::Truncate => bytes.truncate(bytes.len() / 2),
        Damage::NextVersion => {
            let v = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
            bytes[8..12].copy_from_slice(&(v + 1).to_le_bytes());
        }
    }
    fs::write(path, bytes).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Dumps a small fixture, then for every image file and every kind of
/// damage that applies to it restores a damaged copy: each must fail with
/// one error line naming the file, and leave no process behind.
fn damaged_images(w: Width) {
    let mut fx = Fixture::start("syscall", w, &["usleep"]);
    fx.dump(&[]);
    let img = fx.img();
    let mut files: Vec<(PathBuf, bool)> = Vec::new(); // (path, is metadata)
    for e in fs::read_dir(&img).unwrap() {
        let path = e.unwrap().path();
        let head = fs::read(&path).unwrap_or_default();
        if head.starts_with(META_MAGIC) {
            files.push((path, true));
        } else if head.starts_with(PAGES_MAGIC) {
            files.push((path, false));
        }
    }
    files.sort();
    assert!(
        files.iter().any(|(_, meta)| *meta),
        "the dump wrote no metadata file (magic CRYOPOD) in {}",
        img.display()
    );
    let mut case = 0;
    for (file, meta) in &files {
        let kinds: &[Damage] = if *meta {
            &[Damage::FlipByte, Damage::Truncate, Damage::NextVersion]
        } else {
            // Page contents carry no checksum; their header does.
            &[Damage::Truncate, Damage::NextVersion]
        };
        let name = file.file_name().unwrap().to_str().unwrap();
        for how in kinds {
            case += 1;
            let bad = fx.dir.join(&format!("bad-{case}"));
            copy_dir(&img, &bad);
            damage(&bad.join(name), *how);
            let run = cryopod(
                fx.log_dir(),
                &["restore", "-D", bad.to_str().unwrap(), "-d"],
            );
            let left = processes_mentioning(&fx.dir.path);
            for pid in &left {
                kill(*pid, libc::SIGKILL);
            }
            assert!(
                !run.status.success(),
                "restore of {name} with {how:?} succeeded: {}",
                run.describe()
            );
            run.assert_clean_error(&[name]);
            assert!(
                left.is_empty() && !pid_exists(fx.pid),
                "restore of {name} with {how:?} left processes {left:?} behind"
            );
        }
    }
}

both_widths!(restore_of_damaged_images, |w| damaged_images(w));

/// The counter fixture: appends 1, 2, 3... to `count` every 20 ms.
fn start_counter(w: Width, dir: &TestDir) -> Child {
    common::only_std_fds(&mut Command::new(common::fixture("counter", w)))
        .arg(dir.join("count"))
        .arg("20")
        .stdin(Stdio::null())
        .stdout(fs::File::create(dir.join("log")).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn counts_on(path: &Path) -> bool {
    let now = count_lines(path);
    wait_for(Duration::from_secs(5), || count_lines(path) >= now + 3)
}

// dump -R: the original goes on untouched; once it is killed, the image
// restores and counts on from where the dump saw it.
both_widths!(dump_leave_running, |w| {
    let dir = TestDir::new(&format!("leave-running-{}", w.bits()));
    let count = dir.join("count");
    let mut child = start_counter(w, &dir);
    let pid = child.id();
    assert!(wait_for(Duration::from_secs(10), || count_lines(&count) >= 5));
    let before = read_counter(&count).len() as u64;
    let img = dir.join("img");
    cryopod(
        &dir.path,
        &[
            "dump",
            "-t",
            &pid.to_string(),
            "-D",
            img.to_str().unwrap(),
            "-R",
        ],
    )
    .assert_ok();
    let after = read_counter(&count).len() as u64;
    assert_running_untraced(pid);
    assert!(
        counts_on(&count),
        "the original stopped counting after dump -R"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let original = read_counter(&count);
    assert_consecutive("the original's lines", &original, 1);

    let mut restore = spawn_restore(&dir.path, &img);
    let grew = wait_for(Duration::from_secs(10), || {
        count_lines(&count) >= original.len() + 5
    });
    kill(pid, libc::SIGKILL);
    let _ = wait_timeout(&mut restore, Duration::from_secs(10));
    assert!(
        grew,
        "the restored counter did not count\n{}",
        common::restore_log(&dir.path)
    );
    let restored = &read_counter(&count)[original.len()..];
    let first = restored[0];
    assert!(
        (before + 1..=after + 1).contains(&first),
        "the restored counter starts at {first}, the dump saw it between {before} and {after}"
    );
    assert_consecutive("the restored lines", restored, first);
});

// dump -R of a fixture: its own checks still pass afterwards, in the
// original and then in the restored copy.
both_widths!(dump_leave_running_memory, |w| {
    let mut fx = Fixture::start("memory", w, &[]);
    fx.dump(&["-R"]);
    assert_running_untraced(fx.pid);
    fx.kill_original();
    fx.restore();
    fx.go();
    fx.expect_pass();
});

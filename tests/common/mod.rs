//! Shared helpers for the end-to-end tests: building the C fixtures,
//! starting them, and driving `cryopod dump` / `cryopod restore` around them.
//!
//! The fixture protocol is described in tests/README.md.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub const CRYOPOD: &str = env!("CARGO_BIN_EXE_cryopod");

/// How long a fixture may take to print READY, and to finish after go.
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one cryopod command may take.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// Generates one `#[test]` per task width inside a module named `$name`:
/// `$name::m64` and `$name::m32`. The body sees the width as `$w`.
macro_rules! both_widths {
    ($name:ident, |$w:ident| $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[test]
            fn m64() {
                let $w = crate::common::Width::W64;
                $body
            }
            #[test]
            fn m32() {
                let $w = crate::common::Width::W32;
                $body
            }
        }
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Width {
    W64,
    W32,
}

impl Width {
    pub fn gcc_flag(self) -> &'static str {
        match self {
            Width::W64 => "-m64",
            Width::W32 => "-m32",
        }
    }

    pub fn bits(self) -> u32 {
        match self {
            Width::W64 => 64,
            Width::W32 => 32,
        }
    }
}

// ---------------------------------------------------------------------------
// Building fixtures

fn fixtures_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Extra gcc flags a fixture asks for with a `// cryopod-cflags: ...` line.
fn extra_cflags(source: &str) -> Vec<String> {
    source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("// cryopod-cflags:"))
        .flat_map(|flags| flags.split_whitespace().map(str::to_owned))
        .collect()
}

/// Compiles tests/fixtures/NAME.c for `width` (once per test binary run) and
/// returns the executable's path.
pub fn fixture(name: &str, width: Width) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<(String, Width), PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(&(name.to_owned(), width)) {
        return path.clone();
    }
    let src = fixtures_src().join(format!("{name}.c"));
    let text = fs::read_to_string(&src).unwrap_or_else(|e| panic!("read {}: {e}", src.display()));
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fixtures");
    fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join(format!("{name}-{}", width.bits()));
    // Build next to the final name and rename, so that a concurrent run
    // never executes a half-written binary.
    let tmp = out_dir.join(format!(".{name}-{}.{}", width.bits(), std::process::id()));
    let output = Command::new("gcc")
        .args([width.gcc_flag(), "-O1", "-g", "-Wall", "-pthread"])
        .args(extra_cflags(&text))
        .arg("-I")
        .arg(fixtures_src())
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .output()
        .expect("run gcc (install it with scripts/setup.sh)");
    assert!(
        output.status.success(),
        "gcc {} {name}.c failed (for -m32 run scripts/setup.sh to get gcc-multilib):\n{}",
        width.gcc_flag(),
        String::from_utf8_lossy(&output.stderr)
    );
    fs::rename(&tmp, &exe).unwrap();
    built.insert((name.to_owned(), width), exe.clone());
    exe
}

// ---------------------------------------------------------------------------
// Work directories

/// A per-test directory under the cargo target dir. Removed when the test
/// passes, kept (and its path printed) when it fails.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(label: &str) -> TestDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("runs")
            .join(format!("{label}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TestDir { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------
// Processes

pub fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The one-letter state from /proc/PID/stat, if the process exists.
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// A field of /proc/PID/status ("TracerPid", "SigBlk", ...).
pub fn status_field(pid: u32, field: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// Asserts that every thread of `pid` runs freely: not stopped, not traced.
pub fn assert_running_untraced(pid: u32) {
    let tasks = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("process {pid} is gone: {e}"));
    for task in tasks {
        let tid = task.unwrap().file_name().to_string_lossy().into_owned();
        let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
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
            !state.starts_with('T') && !state.starts_with('t') && !state.starts_with('Z'),
            "thread {tid} of {pid} is in state {state} after the failed dump"
        );
        assert_eq!(
            get("TracerPid:"),
            "0",
            "thread {tid} of {pid} is still traced"
        );
    }
}

/// Starts `cmd` with cwd `dir`, stdin /dev/null, output to dir/log and
/// only fds 0-2.
pub fn start_in(dir: &TestDir, cmd: &mut Command) -> Child {
    let log = File::create(dir.join("log")).unwrap();
    only_std_fds(cmd)
        .current_dir(&dir.path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {cmd:?}: {e} (run scripts/setup.sh)"))
}

/// Makes `cmd` start with only fds 0-2. The test runner hands its children
/// more (cargo's jobserver pipe, for one), and the processes we dump must
/// hold only what the fixture protocol gives them: pipes cannot be dumped.
pub fn only_std_fds(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: close_range(2) is async-signal-safe and touches no memory; it
    // runs in the forked child just before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        })
    }
}

pub fn kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) takes plain integers; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Waits for `child` to exit, killing it after `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        sleep(Duration::from_millis(10));
    }
}

/// Polls until the process is gone or a zombie (an orphan is reaped by
/// PID 1, which can take a second).
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match proc_state(pid) {
            None | Some('Z') | Some('X') => return true,
            _ => sleep(Duration::from_millis(20)),
        }
    }
    false
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        sleep(Duration::from_millis(20));
    }
}

/// Describes an exit status the way the tool reports it: code, or 128+signal.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// A helper process killed and reaped when dropped (also on panic).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// ---------------------------------------------------------------------------
// Running cryopod

/// What one cryopod command did.
pub struct ToolRun {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl ToolRun {
    pub fn describe(&self) -> String {
        format!(
            "cryopod {} exited with {}\n--- stderr ---\n{}--- stdout ---\n{}",
            self.args.join(" "),
            exit_code(self.status),
            self.stderr,
            self.stdout
        )
    }

    pub fn assert_ok(&self) -> &Self {
        assert!(self.status.success(), "{}", self.describe());
        self
    }

    /// The command failed with a short error: non-zero exit and exactly one
    /// non-empty stderr line (log lines aside) containing every string in
    /// `names`.
    pub fn assert_clean_error(&self, names: &[&str]) {
        assert!(
            !self.status.success() && self.status.code().is_some(),
            "expected a non-zero exit, got: {}",
            self.describe()
        );
        let plain = strip_ansi(&self.stderr);
        let lines: Vec<&str> = plain
            .lines()
            .filter(|l| !l.trim().is_empty() && !is_log_line(l))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "expected one error line on stderr: {}",
            self.describe()
        );
        for name in names {
            assert!(
                lines[0].contains(name),
                "the error line does not name {name:?}: {}",
                self.describe()
            );
        }
    }
}

/// Removes terminal colour sequences (ESC [ ... letter).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `tracing` log line ("2026-01-02T03:04:05.123Z  INFO ..."), as opposed
/// to the error report.
fn is_log_line(line: &str) -> bool {
    let b = line.trim_start().as_bytes();
    b.len() > 11 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[10] == b'T'
}

/// Runs cryopod with `args` to completion (killed after TOOL_TIMEOUT), with
/// its stdout and stderr captured through files in `log_dir`.
pub fn cryopod(log_dir: &Path, args: &[&str]) -> ToolRun {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    let out_path = log_dir.join(format!("cryopod-{n}.out"));
    let err_path = log_dir.join(format!("cryopod-{n}.err"));
    let mut child = Command::new(CRYOPOD)
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .expect("start cryopod");
    let status = wait_timeout(&mut child, TOOL_TIMEOUT)
        .unwrap_or_else(|| panic!("cryopod {} hung for {TOOL_TIMEOUT:?}", args.join(" ")));
    ToolRun {
        args: args.iter().map(|s| s.to_string()).collect(),
        status,
        stdout: fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

/// Starts `cryopod restore -D img` without -d: the restored process runs as
/// the child of that command, whose exit status is the process's.
pub fn spawn_restore(log_dir: &Path, img: &Path) -> Child {
    Command::new(CRYOPOD)
        .args(["restore", "-D"])
        .arg(img)
        .stdin(Stdio::null())
        .stdout(File::create(log_dir.join("restore.out")).unwrap())
        .stderr(File::create(log_dir.join("restore.err")).unwrap())
        .spawn()
        .expect("start cryopod restore")
}

pub fn restore_log(log_dir: &Path) -> String {
    format!(
        "--- restore stderr ---\n{}--- restore stdout ---\n{}",
        fs::read_to_string(log_dir.join("restore.err")).unwrap_or_default(),
        fs::read_to_string(log_dir.join("restore.out")).unwrap_or_default()
    )
}

// ---------------------------------------------------------------------------
// A running fixture

/// A fixture process and its work directory. Whatever is still running when
/// this is dropped (the original, a restored copy, a restore command) is
/// killed.
pub struct Fixture {
    pub name: String,
    pub width: Width,
    pub dir: TestDir,
    pub pid: u32,
    child: Option<Child>,
    restore: Option<Child>,
    /// A restored process that is not our child (restored with -d).
    detached: bool,
}

impl Fixture {
    /// Starts fixture `name` built for `width` with `<dir> args...` and
    /// waits until it prints READY.
    pub fn start(name: &str, width: Width, args: &[&str]) -> Fixture {
        let exe = fixture(name, width);
        let label = format!("{name}-{}-{}", width.bits(), args.join("-"));
        let dir = TestDir::new(label.trim_end_matches('-'));
        fs::write(dir.join("go"), [0u8; 4096]).unwrap();
        let out = File::create(dir.join("out")).unwrap();
        let child = only_std_fds(&mut Command::new(&exe))
            .arg(&dir.path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", exe.display()));
        let mut fx = Fixture {
            name: name.to_owned(),
            width,
            pid: child.id(),
            dir,
            child: Some(child),
            restore: None,
            detached: false,
        };
        fx.wait_ready();
        fx
    }

    fn wait_ready(&mut self) {
        let ready = wait_for(READY_TIMEOUT, || {
            if self.output().lines().any(|l| l == "READY") {
                return true;
            }
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none(),
                "{} exited before READY ({:?}):\n{}",
                self.name,
                exited,
                self.output()
            );
            false
        });
        assert!(ready, "{} printed no READY:\n{}", self.name, self.output());
    }

    /// Everything the fixture printed so far.
    pub fn output(&self) -> String {
        fs::read_to_string(self.dir.join("out")).unwrap_or_default()
    }

    pub fn img(&self) -> PathBuf {
        self.dir.join("img")
    }

    pub fn log_dir(&self) -> &Path {
        &self.dir.path
    }

    /// Writes 1 into the go page: the fixture goes on to its checks.
    pub fn go(&self) {
        let f = OpenOptions::new()
            .write(true)
            .open(self.dir.join("go"))
            .unwrap();
        f.write_all_at(&[1], 0).unwrap();
    }

    /// `cryopod dump -t PID -D img extra...`, asserting success. Without -R
    /// the original must then be dead (SIGKILL) and is reaped, so that its
    /// pid is free for the restore.
    pub fn dump(&mut self, extra: &[&str]) -> ToolRun {
        let pid = self.pid.to_string();
        let img = self.img();
        let mut args = vec!["dump", "-t", &pid, "-D", img.to_str().unwrap()];
        args.extend_from_slice(extra);
        let run = cryopod(self.log_dir(), &args);
        assert!(
            run.status.success(),
            "{}\nfixture output:\n{}",
            run.describe(),
            self.output()
        );
        let leave_running = extra.iter().any(|a| *a == "-R" || *a == "--leave-running");
        if !leave_running {
            self.reap_killed();
        }
        run
    }

    /// Reaps the original process, which the dump must have SIGKILLed.
    pub fn reap_killed(&mut self) {
        let mut child = self.child.take().expect("original already reaped");
        let status = wait_timeout(&mut child, Duration::from_secs(10))
            .expect("the dumped process is still alive 10 s after the dump");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "the dumped process ended with {status:?}, not SIGKILL; output:\n{}",
            self.output()
        );
    }

    /// Kills the original (after dump -R) and reaps it.
    pub fn kill_original(&mut self) {
        let mut child = self.child.take().expect("original already reaped");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts `cryopod restore -D img` (attached).
    pub fn restore(&mut self) {
        assert!(
            !pid_exists(self.pid),
            "pid {} is still in use before restore",
            self.pid
        );
        self.restore = Some(spawn_restore(self.log_dir(), &self.img()));
    }

    /// `cryopod restore -D img -d --pidfile F`: returns once the process
    /// runs; asserts it got its old pid.
    pub fn restore_detached(&mut self) -> ToolRun {
        let pidfile = self.dir.join("restored.pid");
        let img = self.img();
        let run = cryopod(
            self.log_dir(),
            &[
                "restore",
                "-D",
                img.to_str().unwrap(),
                "-d",
                "--pidfile",
                pidfile.to_str().unwrap(),
            ],
        );
        run.assert_ok();
        self.detached = true;
        let written = fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("read --pidfile {}: {e}", pidfile.display()));
        assert_eq!(
            written.trim(),
            self.pid.to_string(),
            "restored pid differs from the dumped one"
        );
        assert!(
            pid_exists(self.pid),
            "restore -d returned but pid {} does not exist",
            self.pid
        );
        run
    }

    /// Waits for the attached restore (or, for -d, for the process to go
    /// away) and returns the exit code (None for a detached process, whose
    /// status we cannot see).
    pub fn wait_end(&mut self) -> Option<i32> {
        if let Some(mut restore) = self.restore.take() {
            let status = wait_timeout(&mut restore, FINISH_TIMEOUT);
            let status = status.unwrap_or_else(|| {
                kill(self.pid, libc::SIGKILL);
                panic!(
                    "{} did not finish within {FINISH_TIMEOUT:?} after restore\n{}\n--- fixture output ---\n{}",
                    self.name,
                    restore_log(self.log_dir()),
                    self.output()
                )
            });
            Some(exit_code(status))
        } else if self.detached {
            let gone = wait_gone(self.pid, FINISH_TIMEOUT);
            if !gone {
                kill(self.pid, libc::SIGKILL);
            }
            assert!(
                gone,
                "{} (pid {}) did not finish within {FINISH_TIMEOUT:?}:\n{}",
                self.name,
                self.pid,
                self.output()
            );
            self.detached = false;
            None
        } else {
            let mut child = self.child.take().expect("nothing to wait for");
            let status = wait_timeout(&mut child, FINISH_TIMEOUT)
                .unwrap_or_else(|| panic!("{} did not finish:\n{}", self.name, self.output()));
            Some(exit_code(status))
        }
    }

    /// Waits for the end and asserts exit 0 and a final PASS line.
    pub fn expect_pass(&mut self) {
        let code = self.wait_end();
        let out = self.output();
        let restore_log = if self.dir.join("restore.err").exists() {
            restore_log(self.log_dir())
        } else {
            String::new()
        };
        assert!(
            out.lines().last() == Some("PASS") && !out.contains("FAIL"),
            "{} ({}-bit) did not pass (exit {code:?}):\n{out}\n{restore_log}",
            self.name,
            self.width.bits()
        );
        if let Some(code) = code {
            assert_eq!(code, 0, "{} printed PASS but exited with {code}", self.name);
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut restore) = self.restore.take() {
            kill(self.pid, libc::SIGKILL);
            let _ = restore.kill();
            let _ = restore.wait();
        }
        if self.detached && pid_exists(self.pid) {
            kill(self.pid, libc::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------
// Standard flows

/// Runs a fixture without any dump: its own checks must pass.
pub fn baseline(name: &str, width: Width, args: &[&str]) {
    let mut fx = Fixture::start(name, width, args);
    fx.go();
    fx.expect_pass();
}

/// Start, dump, reap, restore attached, go: the fixture must pass and the
/// restore command must exit 0.
pub fn round_trip(name: &str, width: Width, args: &[&str]) {
    let mut fx = Fixture::start(name, width, args);
    fx.dump(&[]);
    assert_show_works(&fx);
    fx.restore();
    fx.go();
    fx.expect_pass();
}

/// Like `round_trip`, but restores with -d and compares the process as seen
/// from outside (/proc/PID) before the dump and after the restore.
pub fn round_trip_detached(name: &str, width: Width, args: &[&str]) {
    let mut fx = Fixture::start(name, width, args);
    let before = ProcView::take(fx.pid);
    fx.dump(&[]);
    fx.restore_detached();
    let after = ProcView::take(fx.pid);
    before.assert_same(&after);
    if width == Width::W32 {
        assert!(
            !after.maps.contains("[vsyscall]"),
            "a 32-bit task has a [vsyscall] mapping after restore:\n{}",
            after.maps
        );
    }
    fx.go();
    fx.expect_pass();
}

/// `cryopod show DIR` prints the image as JSON that mentions the pid.
pub fn assert_show_works(fx: &Fixture) {
    let run = cryopod(fx.log_dir(), &["show", fx.img().to_str().unwrap()]);
    run.assert_ok();
    let json: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("cryopod show printed no JSON ({e}):\n{}", run.stdout));
    assert!(
        json_has_number(&json, fx.pid as u64),
        "cryopod show does not mention pid {}:\n{}",
        fx.pid,
        run.stdout
    );
}

fn json_has_number(v: &serde_json::Value, n: u64) -> bool {
    match v {
        serde_json::Value::Number(x) => x.as_u64() == Some(n),
        serde_json::Value::Array(a) => a.iter().any(|x| json_has_number(x, n)),
        serde_json::Value::Object(o) => o.values().any(|x| json_has_number(x, n)),
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// A process seen from outside

/// What /proc shows about a process, for before/after comparisons.
#[derive(Debug)]
pub struct ProcView {
    pub maps: String,
    pub status: Vec<(String, String)>,
    pub personality: String,
    pub exe: PathBuf,
}

const STATUS_FIELDS: &[&str] = &[
    "Umask",
    "SigPnd",
    "ShdPnd",
    "SigBlk",
    "SigIgn",
    "SigCgt",
    "NoNewPrivs",
    "Seccomp",
];

impl ProcView {
    pub fn take(pid: u32) -> ProcView {
        let read = |f: &str| {
            fs::read_to_string(format!("/proc/{pid}/{f}"))
                .unwrap_or_else(|e| panic!("read /proc/{pid}/{f}: {e}"))
        };
        ProcView {
            maps: read("maps"),
            status: STATUS_FIELDS
                .iter()
                .map(|f| (f.to_string(), status_field(pid, f).unwrap_or_default()))
                .collect(),
            personality: read("personality").trim().to_owned(),
            exe: fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
        }
    }

    pub fn assert_same(&self, after: &ProcView) {
        assert_same_lines(
            "/proc/PID/maps",
            &comparable_maps(&self.maps),
            &comparable_maps(&after.maps),
        );
        for ((field, b), (_, a)) in self.status.iter().zip(&after.status) {
            assert_eq!(b, a, "/proc/PID/status {field}: was {b}, now {a}");
        }
        assert_eq!(
            self.personality, after.personality,
            "/proc/PID/personality changed"
        );
        assert_eq!(self.exe, after.exe, "/proc/PID/exe changed");
    }
}

/// /proc/PID/maps text with the one field no restore can keep zeroed: the
/// inode of shared anonymous memory ("/dev/zero (deleted)"), a shmem object
/// numbered when it is created.
pub fn comparable_maps(maps: &str) -> String {
    maps.lines()
        .map(|line| {
            if !line.ends_with("/dev/zero (deleted)") {
                return line.to_owned();
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            format!(
                "{} {} {} {} 0 {}",
                fields[0],
                fields[1],
                fields[2],
                fields[3],
                fields[5..].join(" ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Asserts two texts are equal, reporting the first differing line.
pub fn assert_same_lines(what: &str, before: &str, after: &str) {
    let (b, a): (Vec<&str>, Vec<&str>) = (before.lines().collect(), after.lines().collect());
    for i in 0..b.len().max(a.len()) {
        let (lb, la) = (b.get(i).copied(), a.get(i).copied());
        assert_eq!(
            lb,
            la,
            "{what} differs at line {}:\nbefore:\n{before}\nafter:\n{after}",
            i + 1
        );
    }
}

// ---------------------------------------------------------------------------
// Counters in files

/// Number of complete lines in a counter file (0 if missing).
pub fn count_lines(path: &Path) -> usize {
    fs::read_to_string(path)
        .map(|s| s.matches('\n').count())
        .unwrap_or(0)
}

/// Parses a counter file: every complete line a number.
pub fn read_counter(path: &Path) -> Vec<u64> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| {
            l.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{}: bad line {l:?}", path.display()))
        })
        .collect()
}

/// Asserts the numbers run `first, first+1, ...` with no gap or repeat.
pub fn assert_consecutive(what: &str, numbers: &[u64], first: u64) {
    for (i, n) in numbers.iter().enumerate() {
        assert_eq!(
            *n,
            first + i as u64,
            "{what}: line {} is {n}, expected {} (gap or repeat); all: {numbers:?}",
            i + 1,
            first + i as u64
        );
    }
}

/// Writes `text` to a new file (used for scripts the tests run).
pub fn write_file(path: &Path, text: &str) {
    let mut f = File::create(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Reports a check that cannot run here. Written straight to stderr (which
/// the test runner does not capture) so that scripts/test.sh lists it.
pub fn skip(reason: &str) {
    let _ = writeln!(std::io::stderr(), "skipped: {reason}");
}

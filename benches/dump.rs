//! `cargo bench --bench dump`: how fast cryopod dumps and restores a process
//! with a lot of memory, compared with what this machine can do at all.
//!
//! The machine is small and first touches of fresh memory are slow, so
//! nothing is compared with a number from elsewhere: every figure is shown
//! next to two baselines measured in the same run, with warm buffers:
//! a plain memcpy and a write(2) of the same size into the page cache of the
//! filesystem that holds the image. See bench/README.md.
//!
//! A benchmark, not a test: there are no timing assertions, but any failing
//! command (gcc, cryopod dump or restore, a workload that dies) aborts the
//! run with an error.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, String>;

const RUNS: usize = 3;
const MIB: usize = 1 << 20;

fn main() {
    // `cargo bench` passes --bench (and maybe a filter); nothing to parse.
    if let Err(e) = run() {
        eprintln!("\nbench dump FAILED: {e}");
        std::process::exit(1);
    }
}

/// One workload width.
struct Width {
    name: &'static str,
    flag: &'static str,
    default_mib: usize,
}

const WIDTHS: [Width; 2] = [
    Width {
        name: "64-bit",
        flag: "-m64",
        default_mib: 1024,
    },
    Width {
        name: "32-bit",
        flag: "-m32",
        default_mib: 512,
    },
];

/// Everything measured for one width.
struct Figures {
    width: &'static str,
    mib: usize,
    pages: u64,
    memcpy: f64,
    file_write: f64,
    dump: Vec<Duration>,
    frozen_ms: Vec<f64>,
    restore: Vec<Duration>,
}

fn run() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    // CARGO_TARGET_TMPDIR is set by cargo for benchmarks: target/tmp.
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cryopod-bench");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    let cryopod = cryopod_binary(&root)?;
    println!("cryopod binary: {}", cryopod.display());
    println!("work dir:       {}", work.display());
    let override_mib = match std::env::var("CRYOPOD_BENCH_MIB") {
        Ok(s) => Some(
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("CRYOPOD_BENCH_MIB={s:?} is not a positive number"))?,
        ),
        Err(_) => None,
    };
    // So that a process restored with -d (orphaned when cryopod exits) is
    // re-parented to us and can be reaped after it is killed.
    // SAFETY: plain prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };

    let mut all = Vec::new();
    let mut skipped = Vec::new();
    for width in &WIDTHS {
        let mib = override_mib.unwrap_or(width.default_mib);
        println!("\n== {} workload, {mib} MiB ==", width.name);
        let exe = work.join(format!("workload{}", &width.flag[2..]));
        if let Err(why) = compile(&root.join("bench/workload.c"), &exe, width.flag) {
            if width.flag == "-m64" {
                return Err(why);
            }
            println!("skipped: {why}");
            skipped.push(format!("{}: skipped: {why}", width.name));
            continue;
        }
        all.push(bench_width(width, mib, &exe, &cryopod, &work)?);
    }
    print_table(&all, &skipped);
    let _ = fs::remove_dir_all(&work);
    Ok(())
}

/// The cryopod executable, release build. Cargo builds the package's binaries
/// before running a benchmark and tells where (CARGO_BIN_EXE_*); if that is
/// missing, target/release/cryopod is built with `cargo build --release`.
fn cryopod_binary(root: &Path) -> Result<PathBuf> {
    if let Some(p) = option_env!("CARGO_BIN_EXE_cryopod") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    println!("building cryopod: {cargo} build --release --bin cryopod");
    let status = Command::new(&cargo)
        .args(["build", "--release", "--bin", "cryopod"])
        .current_dir(root)
        .status()
        .map_err(|e| format!("running {cargo}: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build --release failed: {status}"));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let p = target.join("release/cryopod");
    if !p.is_file() {
        return Err(format!("{} not found after the build", p.display()));
    }
    Ok(p)
}

fn compile(src: &Path, out: &Path, flag: &str) -> Result<()> {
    let o = Command::new("gcc")
        .args(["-O2", "-Wall", flag, "-o"])
        .arg(out)
        .arg(src)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("gcc {flag}: cannot run gcc: {e}"))?;
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        let first = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        return Err(format!("gcc {flag} failed ({}): {first}", o.status));
    }
    Ok(())
}

/// Closes every fd above 2 in a child before exec: the environment may have
/// leaked a pipe, and cryopod refuses to dump one.
fn close_extra_fds(cmd: &mut Command) {
    // SAFETY: close_range is async-signal-safe; nothing else runs in between.
    unsafe {
        cmd.pre_exec(|| {
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                // Old kernel: close what is open, one by one.
                for fd in 3..1024 {
                    libc::close(fd);
                }
            }
            Ok(())
        });
    }
}

fn bench_width(
    width: &Width,
    mib: usize,
    exe: &Path,
    cryopod: &Path,
    work: &Path,
) -> Result<Figures> {
    let bytes = mib * MIB;
    let memcpy = memcpy_baseline(bytes);
    println!("memcpy baseline:     {memcpy:8.0} MiB/s (best of {RUNS}, warm buffers)");
    let file_write = file_write_baseline(bytes, work)?;
    println!("file write baseline: {file_write:8.0} MiB/s (best of {RUNS}, page cache, no fsync)");

    let tag = &width.flag[2..];
    let out = work.join(format!("workload{tag}.out"));
    let err = work.join(format!("workload{tag}.err"));
    let mut child = start_workload(exe, mib, &out, &err)?;
    let pid = child.id() as i32;
    println!("workload pid {pid} ready");

    let dir = work.join(format!("img{tag}"));
    let mut dump = Vec::new();
    let mut frozen_ms = Vec::new();
    let mut pages = 0;
    for i in 0..RUNS {
        let _ = fs::remove_dir_all(&dir);
        let log = work.join(format!("dump{tag}-{i}.log"));
        let (t, status) = time_cryopod(
            cryopod,
            &["dump", "-R", "-t", &pid.to_string(), "-D"],
            &dir,
            &log,
            work,
        )?;
        if !status.success() {
            let _ = child.kill();
            return Err(format!(
                "cryopod dump -R -t {pid} failed ({status}); log:\n{}",
                read_lossy(&log)
            ));
        }
        let line = read_lossy(&log)
            .lines()
            .find(|l| l.contains("dump complete"))
            .map(str::to_owned)
            .ok_or_else(|| format!("no \"dump complete\" line in {}", log.display()))?;
        let f = field(&line, "frozen_ms")
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("no frozen_ms in: {line}"))?;
        pages = field(&line, "pages")
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("no pages in: {line}"))?;
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!("workload died after dump -R: {st}"));
        }
        println!(
            "dump {}: {:8.1} ms  {:7.0} MiB/s  frozen {f:8.1} ms  pages {pages}",
            i + 1,
            ms(t),
            mib_per_s(bytes, t)
        );
        dump.push(t);
        frozen_ms.push(f);
    }
    let want = (bytes / 4096) as u64;
    if pages < want {
        println!("note: dump saved {pages} pages, fewer than the {want} the workload filled");
    }

    // Restore the image of the last dump, RUNS times.
    child.kill().map_err(|e| format!("kill {pid}: {e}"))?;
    child.wait().map_err(|e| format!("wait {pid}: {e}"))?;
    wait_pid_free(pid)?;
    let mut restore = Vec::new();
    for i in 0..RUNS {
        let log = work.join(format!("restore{tag}-{i}.log"));
        let (t, status) = time_cryopod(cryopod, &["restore", "-d", "-D"], &dir, &log, work)?;
        if !status.success() {
            return Err(format!(
                "cryopod restore -d -D {} failed ({status}); log:\n{}",
                dir.display(),
                read_lossy(&log)
            ));
        }
        check_alive(pid)?;
        println!(
            "restore {}: {:8.1} ms  {:7.0} MiB/s  (pid {pid} alive)",
            i + 1,
            ms(t),
            mib_per_s(bytes, t)
        );
        restore.push(t);
        kill_and_reap(pid)?;
    }
    let _ = fs::remove_dir_all(&dir);
    Ok(Figures {
        width: width.name,
        mib,
        pages,
        memcpy,
        file_write,
        dump,
        frozen_ms,
        restore,
    })
}

/// Best of RUNS memcpys of `bytes` between two buffers that were both
/// written first.
fn memcpy_baseline(bytes: usize) -> f64 {
    let mut src = vec![0u8; bytes];
    let mut dst = vec![0u8; bytes];
    // Touch every page of both (vec![0; n] may be untouched zero pages).
    for (i, b) in src.iter_mut().enumerate().step_by(512) {
        *b = (i >> 9) as u8 | 1;
    }
    dst.fill(0x5a);
    let mut best = Duration::MAX;
    for _ in 0..RUNS {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed());
    }
    mib_per_s(bytes, best)
}

/// Best of RUNS writes of `bytes` (from a warm buffer, 8 MiB per write) into
/// a new file next to the image directories; the file is deleted between
/// runs, as the image directory is between dumps. Page cache only: no fsync.
fn file_write_baseline(bytes: usize, work: &Path) -> Result<f64> {
    let chunk = 8 * MIB;
    let buf = vec![0xa5u8; chunk];
    let path = work.join("write-baseline.bin");
    let mut best = Duration::MAX;
    for _ in 0..RUNS {
        let _ = fs::remove_file(&path);
        let t = Instant::now();
        let f = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut off = 0;
        while off < bytes {
            let n = chunk.min(bytes - off);
            f.write_all_at(&buf[..n], off as u64)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            off += n;
        }
        drop(f);
        best = best.min(t.elapsed());
    }
    let _ = fs::remove_file(&path);
    Ok(mib_per_s(bytes, best))
}

fn start_workload(exe: &Path, mib: usize, out: &Path, err: &Path) -> Result<Child> {
    let stdout = File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let stderr = File::create(err).map_err(|e| format!("{}: {e}", err.display()))?;
    let mut cmd = Command::new(exe);
    cmd.arg(mib.to_string())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    close_extra_fds(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting {}: {e}", exe.display()))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if read_lossy(out).contains("READY") {
            return Ok(child);
        }
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            return Err(format!(
                "workload exited before READY ({st}): {}",
                read_lossy(err)
            ));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("workload not READY after 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cryopod ARGS DIR -o LOG` and times it from spawn to exit. Its
/// stdout and stderr go to files, not pipes: a process restored with -d
/// must not hold a pipe of ours.
fn time_cryopod(
    cryopod: &Path,
    args: &[&str],
    dir: &Path,
    log: &Path,
    work: &Path,
) -> Result<(Duration, ExitStatus)> {
    let console = work.join("cryopod.console");
    let out = File::create(&console).map_err(|e| format!("{}: {e}", console.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(cryopod);
    cmd.args(args)
        .arg(dir)
        .arg("-o")
        .arg(log)
        .env("CRYOPOD_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    close_extra_fds(&mut cmd);
    let t = Instant::now();
    let status = cmd
        .status()
        .map_err(|e| format!("running {}: {e}", cryopod.display()))?;
    let elapsed = t.elapsed();
    let console_text = read_lossy(&console);
    if !status.success() && !console_text.trim().is_empty() {
        // Let the caller's error carry the log; the console may hold more.
        eprintln!("cryopod said:\n{console_text}");
    }
    Ok((elapsed, status))
}

/// `key=value` from a tracing fmt line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(pat.as_str()))
}

fn proc_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the ")" that ends comm.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn wait_pid_free(pid: i32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        if Instant::now() > deadline {
            return Err(format!("pid {pid} still in use 10 s after it was killed"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn check_alive(pid: i32) -> Result<()> {
    // Give the restored task a moment to run its first instructions.
    std::thread::sleep(Duration::from_millis(100));
    match proc_state(pid) {
        Some('Z' | 'X') | None => Err(format!(
            "restored process {pid} is not alive (state {:?})",
            proc_state(pid)
        )),
        Some(_) => Ok(()),
    }
}

fn kill_and_reap(pid: i32) -> Result<()> {
    // SAFETY: plain syscalls on a pid we restored.
    unsafe {
        if libc::kill(pid, libc::SIGKILL) != 0 {
            return Err(format!("kill {pid}: {}", std::io::Error::last_os_error()));
        }
        // We are a subreaper, so the orphaned restored task is our child now
        // (unless cryopod is still its parent for a moment: then ECHILD and
        // the /proc poll below does the waiting).
        let mut st = 0;
        libc::waitpid(pid, &mut st, 0);
    }
    wait_pid_free(pid)
}

fn read_lossy(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib_per_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / MIB as f64 / d.as_secs_f64()
}

fn best(v: &[Duration]) -> Duration {
    v.iter().copied().min().unwrap_or_default()
}

fn print_table(all: &[Figures], skipped: &[String]) {
    let line = "-".repeat(100);
    let mut s = format!("\n{line}\n");
    s.push_str(&format!(
        "{:<7} {:>5}  {:<13} {:>9} {:>8} {:>10} {:>9} {:>9}  {}\n",
        "width",
        "MiB",
        "what",
        "best ms",
        "MiB/s",
        "frozen ms",
        "÷memcpy",
        "÷file wr",
        "all runs, ms"
    ));
    s.push_str(&format!("{line}\n"));
    for f in all {
        let bytes = f.mib * MIB;
        let row = |what: &str, t: Option<Duration>, rate: f64, frozen: String, runs: String| {
            format!(
                "{:<7} {:>5}  {:<13} {:>9} {:>8.0} {:>10} {:>9.2} {:>9.2}  {}\n",
                f.width,
                f.mib,
                what,
                t.map(|t| format!("{:.1}", ms(t))).unwrap_or_default(),
                rate,
                frozen,
                rate / f.memcpy,
                rate / f.file_write,
                runs
            )
        };
        let join = |v: &[Duration]| {
            v.iter()
                .map(|d| format!("{:.0}", ms(*d)))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let bytes_t = |rate: f64| Duration::from_secs_f64(bytes as f64 / MIB as f64 / rate);
        s.push_str(&row(
            "memcpy",
            Some(bytes_t(f.memcpy)),
            f.memcpy,
            String::new(),
            String::new(),
        ));
        s.push_str(&row(
            "file write",
            Some(bytes_t(f.file_write)),
            f.file_write,
            String::new(),
            String::new(),
        ));
        let t = best(&f.dump);
        let frozen = f.frozen_ms.iter().copied().fold(f64::INFINITY, f64::min);
        let frozen_runs = f
            .frozen_ms
            .iter()
            .map(|v| format!("{v:.0}"))
            .collect::<Vec<_>>()
            .join(" / ");
        s.push_str(&row(
            "dump -R",
            Some(t),
            mib_per_s(bytes, t),
            format!("{frozen:.1}"),
            format!("{}  (frozen {frozen_runs})", join(&f.dump)),
        ));
        let t = best(&f.restore);
        s.push_str(&row(
            "restore -d",
            Some(t),
            mib_per_s(bytes, t),
            String::new(),
            join(&f.restore),
        ));
        s.push_str(&format!(
            "{:<7} {:>5}  pages saved per dump: {} ({:.1} MiB)\n",
            f.width,
            f.mib,
            f.pages,
            f.pages as f64 * 4096.0 / MIB as f64
        ));
        s.push_str(&format!("{line}\n"));
    }
    for k in skipped {
        s.push_str(&format!("{k}\n"));
    }
    s.push_str(
        "best ms / MiB/s: best of 3; dump and restore timed from the start to the exit of the cryopod\n\
         command. frozen ms: from the dump's \"dump complete\" log line (best run). ÷memcpy, ÷file wr:\n\
         MiB/s divided by the memcpy and file-write baselines of the same width and size, same run.\n",
    );
    print!("{s}");
    let _ = std::io::stdout().flush();
}

//! `cryopod dump`: freeze a process, write its image, then kill it or let it
//! go on.

mod files;
mod freeze;
mod inside;
pub mod memory;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{debug, info};

use crate::error::{Error, Result};
use crate::image::{
    FileState, ImageWriter, Inventory, Rseq, SigInfo, SignalState, TaskImage, ThreadImage, Zombie,
};
use crate::proc;
use crate::sys::{self, Pid};
use freeze::Frozen;

pub struct DumpOptions {
    pub pid: Pid,
    pub dir: PathBuf,
    pub leave_running: bool,
}

/// What a finished dump reports.
#[derive(Debug)]
pub struct DumpReport {
    pub pages: u64,
    pub frozen: Duration,
}

/// A frozen process of the tree.
struct FrozenProc {
    pid: Pid,
    threads: Vec<Frozen>,
    /// Stopped by a signal (SIGSTOP) when frozen.
    stopped: bool,
}

/// Dumps the process tree rooted at `opts.pid`.
///
/// Order, and why: freeze the tree top-down, listing a process's children
/// only once it is frozen (a frozen process cannot fork, so nothing is
/// missed); then, per process, read each thread's registers before any
/// injected syscall clobbers them, run the injected syscalls, put registers
/// and masks back, read /proc and memory; write every image; commit; and
/// only after a complete image kill the tree, or let it go with
/// `--leave-running`. Any error before that drops the freeze guards, which
/// let every thread of every process run on untouched.
pub fn dump(opts: &DumpOptions) -> Result<DumpReport> {
    let root = opts.pid;
    if root.0 == std::process::id() as i32 {
        return Err(Error::Dump {
            pid: root,
            problem: "cryopod cannot dump itself".into(),
        });
    }
    proc::process(root)?;
    info!(pid = %root, dir = %opts.dir.display(), "dumping");
    sys::catch_interrupts();
    let mut writer = ImageWriter::new(&opts.dir)?;

    let (mut procs, zombies) = freeze_tree(root)?;
    let mut all_files = Vec::with_capacity(procs.len());
    for p in &procs {
        all_files.push((p.pid, proc::files(p.pid)?));
    }
    let shares = files::share(&mut all_files)?;
    let mut tasks = Vec::with_capacity(procs.len());
    let mut pages = 0;
    for (p, (_, files)) in procs.iter_mut().zip(all_files) {
        check_interrupt()?;
        let task = dump_process(p, files, &mut writer)?;
        pages += task.page_count;
        tasks.push(task.pid);
    }
    let inventory = Inventory {
        tool_version: env!("CARGO_PKG_VERSION").into(),
        kernel_release: sys::kernel_release(),
        root_pid: root,
        tasks,
        zombies,
        files: shares.files,
        pipes: shares.pipes,
        sockets: shares.sockets,
        dumped_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    check_interrupt()?;
    writer.commit(&inventory)?;

    let since = procs
        .first()
        .and_then(|p| p.threads.first())
        .map(|f| f.since());
    let count = procs.len();
    if opts.leave_running {
        for p in procs.into_iter().rev() {
            freeze::release_process(p.threads)?;
        }
    } else {
        for p in &procs {
            sys::kill(p.pid, libc::SIGKILL).map_err(|source| Error::Sys {
                call: "kill(SIGKILL)",
                pid: p.pid,
                source,
            })?;
        }
        for p in procs.into_iter().rev() {
            freeze::wait_gone(p.threads);
        }
    }
    let frozen_for = since.map(|s| s.elapsed()).unwrap_or_default();
    info!(
        pid = %root,
        processes = count,
        zombies = inventory.zombies.len(),
        pages,
        frozen_ms = frozen_for.as_secs_f64() * 1e3,
        left_running = opts.leave_running,
        "dump complete"
    );
    Ok(DumpReport {
        pages,
        frozen: frozen_for,
    })
}

/// Stops the dump (guards let the tree go, `.part` files are removed) if
/// the user asked to.
pub(crate) fn check_interrupt() -> Result<()> {
    if sys::interrupted() {
        return Err(Error::Interrupted);
    }
    Ok(())
}

/// Freezes `root` and every descendant, parents before children; zombies
/// (exited, not reaped) are recorded, not frozen.
fn freeze_tree(root: Pid) -> Result<(Vec<FrozenProc>, Vec<Zombie>)> {
    let mut procs = Vec::new();
    let mut zombies = Vec::new();
    let mut queue = std::collections::VecDeque::from([root]);
    while let Some(pid) = queue.pop_front() {
        if pid.0 == std::process::id() as i32 {
            return Err(Error::Dump {
                pid: root,
                problem: format!("pid {pid} in its tree is cryopod itself"),
            });
        }
        let ids = proc::ids(pid)?;
        if ids.state == 'Z' {
            if pid == root {
                return Err(Error::Dump {
                    pid,
                    problem: "it is a zombie".into(),
                });
            }
            zombies.push(Zombie {
                pid,
                ppid: ids.ppid,
                pgid: ids.pgid,
                sid: ids.sid,
                status: ids.exit_code,
            });
            continue;
        }
        let threads = freeze::freeze_process(pid)?;
        queue.extend(proc::children(pid)?);
        procs.push(FrozenProc {
            pid,
            threads,
            stopped: ids.state == 'T',
        });
    }
    debug!(
        processes = procs.len(),
        zombies = zombies.len(),
        "tree frozen"
    );
    Ok((procs, zombies))
}

/// Saves one frozen process: its task image and its pages file.
fn dump_process(
    p: &mut FrozenProc,
    files: FileState,
    writer: &mut ImageWriter,
) -> Result<TaskImage> {
    let pid = p.pid;
    let abi = proc::abi(pid)?;
    let ids = proc::ids(pid)?;
    let mut threads = Vec::with_capacity(p.threads.len());
    for f in &mut p.threads {
        threads.push(read_thread(f)?);
    }
    debug!(%pid, abi = abi.name(), threads = threads.len(), "dumping process");

    // Read once: the scratch mapping made and removed below neither merges
    // with nor splits any of these.
    let vmas = proc::vmas(pid)?;
    let inside = inside::read(pid, abi, &mut threads, &vmas)?;
    for (f, t) in p.threads.iter_mut().zip(&threads) {
        f.set_resume_mask(t.blocked);
    }

    let mut mm = proc::mm_state(pid)?;
    mm.brk = inside.brk;
    let (pages, page_count) = memory::plan(pid, &vmas)?;
    let pages_crc = memory::write_pages(pid, &vmas, &pages, page_count, writer)?;

    let task = TaskImage {
        pid,
        ppid: ids.ppid,
        pgid: ids.pgid,
        sid: ids.sid,
        comm: proc::comm(pid)?,
        abi,
        threads,
        ldt: inside.ldt,
        signals: SignalState {
            actions: inside.actions,
            pending_process: peek_pending(pid, true)?,
        },
        mm,
        vmas,
        pages,
        page_count,
        pages_crc,
        files,
        rlimits: proc::rlimits(pid)?,
        personality: proc::personality(pid)?,
        child_subreaper: inside.child_subreaper,
        stopped: p.stopped,
    };
    writer.write_task(&task)?;
    Ok(task)
}

/// What ptrace tells of one frozen thread from outside. The parts only the
/// thread itself can tell are filled in by `inside::read`.
fn read_thread(f: &mut Frozen) -> Result<ThreadImage> {
    let tid = f.pid();
    let ptrace_err = |request| {
        move |source| Error::Ptrace {
            request,
            pid: tid,
            source,
        }
    };
    let regs = sys::ptrace_getregs(tid).map_err(ptrace_err("PTRACE_GETREGS"))?;
    let blocked = sys::ptrace_get_sigmask(tid).map_err(ptrace_err("PTRACE_GETSIGMASK"))?;
    f.set_resume_state(regs, blocked);
    let xstate =
        sys::ptrace_get_xstate(tid).map_err(ptrace_err("PTRACE_GETREGSET(NT_X86_XSTATE)"))?;
    let mut tls = Vec::new();
    for entry in 12..=14 {
        tls.push(
            sys::ptrace_get_thread_area(tid, entry)
                .map_err(ptrace_err("PTRACE_GET_THREAD_AREA"))?,
        );
    }
    let rseq = sys::ptrace_get_rseq(tid)
        .map_err(ptrace_err("PTRACE_GET_RSEQ_CONFIGURATION"))?
        .map(|(addr, len, sig)| Rseq { addr, len, sig });
    debug!(%tid, rip = format!("{:#x}", regs.rip), cs = format!("{:#x}", regs.cs), "registers read");
    Ok(ThreadImage {
        tid,
        regs,
        xstate,
        tls,
        blocked,
        pending: peek_pending(tid, false)?,
        altstack: None,
        rseq,
        robust_list: None,
        clear_child_tid: 0,
    })
}

fn peek_pending(pid: Pid, shared: bool) -> Result<Vec<SigInfo>> {
    let raw = sys::ptrace_peek_siginfo(pid, shared).map_err(|source| Error::Ptrace {
        request: "PTRACE_PEEKSIGINFO",
        pid,
        source,
    })?;
    Ok(raw
        .into_iter()
        .map(|si| SigInfo {
            signo: u32::from_le_bytes([si[0], si[1], si[2], si[3]]),
            raw: si.to_vec(),
        })
        .collect())
}

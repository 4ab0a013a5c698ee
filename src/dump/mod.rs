//! `cryopod dump`: freeze a process, write its image, then kill it or let it
//! go on.

mod freeze;
mod inside;
pub mod memory;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{debug, info};

use crate::error::{Error, Result};
use crate::image::{ImageWriter, Inventory, Rseq, SigInfo, SignalState, TaskImage, ThreadImage};
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

/// Dumps one process.
///
/// Order, and why: freeze every thread first (nothing may change under
/// us); read each thread's registers before any injected syscall clobbers
/// them; run the injected syscalls (signal actions, LDT, brk, and per
/// thread the alternate stack, robust list and tid address), then put
/// registers and masks back; read /proc and memory; write the image;
/// commit it; and only after a complete image kill the process, or let it
/// go with `--leave-running`. Any error before that drops the freeze
/// guards, which let every thread run on untouched.
pub fn dump(opts: &DumpOptions) -> Result<DumpReport> {
    let pid = opts.pid;
    if pid.0 == std::process::id() as i32 {
        return Err(Error::Dump {
            pid,
            problem: "cryopod cannot dump itself".into(),
        });
    }
    proc::process(pid)?;
    let abi = proc::abi(pid)?;
    info!(%pid, abi = abi.name(), dir = %opts.dir.display(), "dumping");
    let mut writer = ImageWriter::new(&opts.dir)?;

    let mut frozen = freeze::freeze_process(pid)?;
    let mut threads = Vec::with_capacity(frozen.len());
    for f in &mut frozen {
        threads.push(read_thread(f)?);
    }
    debug!(%pid, threads = threads.len(), "frozen");

    // Read once: the scratch mapping made and removed below neither merges
    // with nor splits any of these.
    let vmas = proc::vmas(pid)?;
    let inside = inside::read(pid, abi, &mut threads, &vmas)?;

    let mut mm = proc::mm_state(pid)?;
    mm.brk = inside.brk;
    let files = proc::files(pid)?;
    let (pages, page_count) = memory::plan(pid, &vmas)?;
    memory::write_pages(pid, &vmas, &pages, page_count, &mut writer)?;

    let task = TaskImage {
        pid,
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
        files,
        rlimits: proc::rlimits(pid)?,
        personality: proc::personality(pid)?,
    };
    writer.write_task(&task)?;
    let inventory = Inventory {
        tool_version: env!("CARGO_PKG_VERSION").into(),
        kernel_release: sys::kernel_release(),
        root_pid: pid,
        tasks: vec![pid],
        dumped_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    writer.commit(&inventory)?;

    let frozen_for = if opts.leave_running {
        freeze::release_process(frozen)?
    } else {
        freeze::kill_process(pid, frozen)?
    };
    info!(
        %pid,
        threads = task.threads.len(),
        pages = page_count,
        frozen_ms = frozen_for.as_secs_f64() * 1e3,
        left_running = opts.leave_running,
        "dump complete"
    );
    Ok(DumpReport {
        pages: page_count,
        frozen: frozen_for,
    })
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

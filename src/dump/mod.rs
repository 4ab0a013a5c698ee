//! `cryopod dump`: freeze a process, write its image, then kill it or let it
//! go on.

mod freeze;
pub mod memory;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{debug, info};

use crate::arch::nr;
use crate::error::{Error, Result};
use crate::image::{
    AltStack, CoreState, ImageWriter, Inventory, SigAction, SigInfo, SignalState, TaskImage, Vma,
    VmaKind,
};
use crate::inject::Injector;
use crate::sys::{self, Pid};
use crate::{ldt, proc};
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

/// Scratch memory mapped in the task while its state is read.
const SCRATCH_LEN: u64 = 128 << 10;
/// Bytes `modify_ldt(0)` may return: 8192 entries of 8 bytes.
const LDT_BYTES: u64 = 8192 * 8;
const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
const SS_DISABLE: u32 = 2;

/// Dumps one process.
///
/// Order, and why: freeze first (nothing may change under us); read the
/// registers before any injected syscall clobbers them; run the injected
/// syscalls (signal actions, LDT, brk), then put registers and mask back;
/// only then read /proc and memory, so the scratch mapping is gone from
/// what is saved; write the image; commit it; and only after a complete
/// image kill the task, or let it go with `--leave-running`. Any error
/// before the kill drops `Frozen`, which lets the task run on untouched.
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
    let threads = proc::threads(pid)?;
    if threads.len() > 1 {
        return Err(Error::Unsupported {
            pid,
            what: format!("a multi-threaded process ({} threads)", threads.len()),
        });
    }
    info!(%pid, abi = abi.name(), dir = %opts.dir.display(), "dumping");
    let mut writer = ImageWriter::new(&opts.dir)?;

    let mut frozen = Frozen::new(pid)?;
    let ptrace_err = |request| {
        move |source| Error::Ptrace {
            request,
            pid,
            source,
        }
    };
    let regs = sys::ptrace_getregs(pid).map_err(ptrace_err("PTRACE_GETREGS"))?;
    let blocked = sys::ptrace_get_sigmask(pid).map_err(ptrace_err("PTRACE_GETSIGMASK"))?;
    frozen.set_resume_state(regs, blocked);
    let xstate =
        sys::ptrace_get_xstate(pid).map_err(ptrace_err("PTRACE_GETREGSET(NT_X86_XSTATE)"))?;
    let mut tls = Vec::new();
    for entry in 12..=14 {
        tls.push(
            sys::ptrace_get_thread_area(pid, entry)
                .map_err(ptrace_err("PTRACE_GET_THREAD_AREA"))?,
        );
    }
    let pending_thread = peek_pending(pid, false)?;
    let pending_process = peek_pending(pid, true)?;
    debug!(%pid, rip = format!("{:#x}", regs.rip), cs = format!("{:#x}", regs.cs), "registers read");

    // Read once: the scratch mapping made and removed below neither merges
    // with nor splits any of these.
    let vmas = proc::vmas(pid)?;
    let inside = read_from_inside(pid, &regs, &vmas)?;

    let mut mm = proc::mm_state(pid)?;
    mm.brk = inside.brk;
    let files = proc::files(pid)?;
    let (pages, page_count) = memory::plan(pid, &vmas)?;
    memory::write_pages(pid, &vmas, &pages, page_count, &mut writer)?;

    let task = TaskImage {
        pid,
        comm: proc::comm(pid)?,
        abi,
        core: CoreState {
            regs,
            xstate,
            tls,
            ldt: inside.ldt,
        },
        signals: SignalState {
            actions: inside.actions,
            blocked,
            altstack: inside.altstack,
            pending_thread,
            pending_process,
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
        frozen.release()?
    } else {
        frozen.kill()?
    };
    info!(
        %pid,
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

/// State that only the task itself can read.
struct Inside {
    actions: Vec<SigAction>,
    ldt: Vec<sys::UserDesc>,
    brk: u64,
    altstack: Option<AltStack>,
}

/// Runs syscalls inside the frozen task to read its signal actions, LDT and
/// brk. Signals stay blocked meanwhile so none is delivered mid-way.
fn read_from_inside(pid: Pid, regs: &crate::arch::Regs, vmas: &[Vma]) -> Result<Inside> {
    let syscall_at = find_syscall_insn(pid, vmas)?;
    let inj = Injector::new(pid, *regs, syscall_at, None);
    sys::ptrace_set_sigmask(pid, !0).map_err(|source| Error::Ptrace {
        request: "PTRACE_SETSIGMASK",
        pid,
        source,
    })?;
    let none = String::new;
    // A shared mapping never merges with a neighbour, so unmapping it later
    // leaves the task's mappings exactly as they were.
    // Placed by hand below 4 GiB: a 64-bit mmap without a hint fails in an
    // ia32 task (ENOMEM), and low addresses work for both widths.
    let mut used: Vec<(u64, u64)> = vmas.iter().map(|v| (v.start, v.end)).collect();
    let hint = proc::find_hole(&mut used, SCRATCH_LEN).ok_or_else(|| Error::Dump {
        pid,
        problem: "no free address range below 4 GiB for scratch memory".into(),
    })?;
    let scratch = inj.call(
        "mmap",
        nr::x86_64::MMAP,
        [
            hint,
            SCRATCH_LEN,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64 | MAP_FIXED_NOREPLACE,
            u64::MAX,
            0,
        ],
        || format!("{SCRATCH_LEN} bytes of scratch memory"),
    )?;
    let result = (|| {
        let mut actions = Vec::new();
        for signo in 1..=64u64 {
            if signo == libc::SIGKILL as u64 || signo == libc::SIGSTOP as u64 {
                continue;
            }
            inj.call(
                "rt_sigaction",
                nr::x86_64::RT_SIGACTION,
                [signo, 0, scratch, 8, 0, 0],
                || format!("signal {signo}"),
            )?;
            let raw = sys::read_remote(pid, scratch, 32).map_err(|source| Error::Sys {
                call: "process_vm_readv(sigaction)",
                pid,
                source,
            })?;
            let w =
                |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
            if raw.len() == 32 && w(0) != 0 {
                actions.push(SigAction {
                    signo: signo as u32,
                    handler: w(0),
                    flags: w(1),
                    restorer: w(2),
                    mask: w(3),
                });
            }
        }
        let n = inj.call(
            "modify_ldt",
            nr::x86_64::MODIFY_LDT,
            [0, scratch, LDT_BYTES, 0, 0, 0],
            none,
        )?;
        let ldt = if n > 0 {
            let bytes =
                sys::read_remote(pid, scratch, n as usize).map_err(|source| Error::Sys {
                    call: "process_vm_readv(ldt)",
                    pid,
                    source,
                })?;
            ldt::decode_table(&bytes)
        } else {
            Vec::new()
        };
        let brk = inj.call("brk", nr::x86_64::BRK, [0; 6], none)?;
        inj.call(
            "sigaltstack",
            nr::x86_64::SIGALTSTACK,
            [0, scratch, 0, 0, 0, 0],
            none,
        )?;
        let ss = sys::read_remote(pid, scratch, 24).map_err(|source| Error::Sys {
            call: "process_vm_readv(stack_t)",
            pid,
            source,
        })?;
        let word = |i: usize| u64::from_le_bytes(ss[i..i + 8].try_into().unwrap_or([0; 8]));
        let flags = if ss.len() == 24 {
            word(8) as u32
        } else {
            SS_DISABLE
        };
        let altstack = (flags & SS_DISABLE == 0).then(|| AltStack {
            sp: word(0),
            flags,
            size: word(16),
        });
        debug!(%pid, actions = actions.len(), ldt = ldt.len(), brk = format!("{brk:#x}"), "read from inside");
        Ok(Inside {
            actions,
            ldt,
            brk,
            altstack,
        })
    })();
    inj.call(
        "munmap",
        nr::x86_64::MUNMAP,
        [scratch, SCRATCH_LEN, 0, 0, 0, 0],
        || format!("scratch at {scratch:#x}"),
    )?;
    result
}

/// Finds a `syscall` instruction (0f 05) the task can execute: in its vDSO
/// first (every vDSO on AMD has one), else in any executable mapping.
fn find_syscall_insn(pid: Pid, vmas: &[Vma]) -> Result<u64> {
    let mut candidates: Vec<_> = vmas.iter().filter(|v| v.prot.exec && v.prot.read).collect();
    candidates.sort_by_key(|v| !matches!(&v.kind, VmaKind::Vdso { name } if name == "[vdso]"));
    for v in candidates {
        let len = v.len().min(16 << 20) as usize;
        let Ok(bytes) = sys::read_remote(pid, v.start, len) else {
            continue;
        };
        if let Some(i) = bytes.windows(2).position(|w| w == [0x0f, 0x05]) {
            return Ok(v.start + i as u64);
        }
    }
    Err(Error::Dump {
        pid,
        problem: "no syscall instruction found in any executable mapping".into(),
    })
}

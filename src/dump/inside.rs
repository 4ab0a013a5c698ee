//! State that only the task itself can tell: signal actions, the LDT and
//! brk of the process, and per thread the alternate signal stack, the
//! robust futex list and the `set_tid_address` pointer. Read by syscalls
//! injected into the frozen threads, with every signal blocked meanwhile so
//! none is delivered mid-way (the freeze guards put the masks back).

use tracing::{debug, warn};

use crate::arch::{Abi, nr};
use crate::error::{Error, Result};
use crate::image::{AltStack, RobustList, SigAction, ThreadImage, Vma, VmaKind};
use crate::inject::{Entry, Injector};
use crate::sys::{self, Pid, UserDesc};
use crate::{ldt, proc};

/// Scratch memory mapped in the task while its state is read.
const SCRATCH_LEN: u64 = 128 << 10;
/// Bytes `modify_ldt(0)` may return: 8192 entries of 8 bytes.
const LDT_BYTES: u64 = 8192 * 8;
const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
const SS_DISABLE: u32 = 2;
const PR_GET_TID_ADDRESS: u64 = 40;
const PR_GET_CHILD_SUBREAPER: u64 = 37;

/// Process-wide state read from inside.
pub struct Inside {
    pub actions: Vec<SigAction>,
    pub ldt: Vec<UserDesc>,
    pub brk: u64,
    pub child_subreaper: bool,
}

/// Reads the process-wide state through the main thread and the per-thread
/// state through each thread, filling in `threads`.
pub fn read(pid: Pid, abi: Abi, threads: &mut [ThreadImage], vmas: &[Vma]) -> Result<Inside> {
    let syscall_at = find_code(pid, vmas, [0x0f, 0x05]).ok_or_else(|| Error::Dump {
        pid,
        problem: "no syscall instruction found in any executable mapping".into(),
    })?;
    // ia32 tasks keep their robust list in the compat slot, readable only
    // through the 32-bit entry; their vDSO has an `int 0x80`.
    let int80_at = match abi {
        Abi::Ia32 => find_code(pid, vmas, [0xcd, 0x80]),
        Abi::X86_64 => None,
    };
    // A thread waiting with a temporary mask gets its real mask back from
    // the kernel on the way out of the syscall: one harmless syscall later
    // the mask that is read is the one the thread lives with.
    for t in threads
        .iter_mut()
        .filter(|t| t.regs.in_temporary_mask_syscall())
    {
        Injector::new(t.tid, t.regs, syscall_at, int80_at).raw(
            Entry::Native,
            nr::x86_64::GETPID,
            [0; 6],
        )?;
        t.blocked = sys::ptrace_get_sigmask(t.tid).map_err(|source| Error::Ptrace {
            request: "PTRACE_GETSIGMASK",
            pid: t.tid,
            source,
        })?;
        debug!(tid = %t.tid, mask = format!("{:#x}", t.blocked), "real signal mask read after a temporary-mask syscall");
    }
    for t in threads.iter() {
        sys::ptrace_set_sigmask(t.tid, !0).map_err(|source| Error::Ptrace {
            request: "PTRACE_SETSIGMASK",
            pid: t.tid,
            source,
        })?;
    }
    let main = threads.first().ok_or_else(|| Error::Dump {
        pid,
        problem: "no threads".into(),
    })?;
    let inj = Injector::new(pid, main.regs, syscall_at, int80_at);
    // Placed by hand below 4 GiB: a 64-bit mmap without a hint fails in an
    // ia32 task (ENOMEM), and low addresses work for both widths. Shared,
    // so it never merges with a neighbour and unmapping it leaves the
    // mappings exactly as they were.
    let mut used: Vec<(u64, u64)> = vmas.iter().map(|v| (v.start, v.end)).collect();
    let hint = proc::find_hole(&mut used, SCRATCH_LEN).ok_or_else(|| Error::Dump {
        pid,
        problem: "no free address range below 4 GiB for scratch memory".into(),
    })?;
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64 | MAP_FIXED_NOREPLACE;
    let scratch = inj.call(
        "mmap",
        nr::x86_64::MMAP,
        [hint, SCRATCH_LEN, prot, flags, u64::MAX, 0],
        || format!("{SCRATCH_LEN} bytes of scratch memory"),
    )?;
    let result = (|| {
        let inside = read_process(&inj, scratch)?;
        for t in threads.iter_mut() {
            let tinj = Injector::new(t.tid, t.regs, syscall_at, int80_at);
            read_thread(&tinj, abi, scratch, t)?;
        }
        Ok(inside)
    })();
    inj.call(
        "munmap",
        nr::x86_64::MUNMAP,
        [scratch, SCRATCH_LEN, 0, 0, 0, 0],
        || format!("scratch at {scratch:#x}"),
    )?;
    result
}

fn read_back(pid: Pid, addr: u64, len: usize, what: &'static str) -> Result<Vec<u8>> {
    let bytes = sys::read_remote(pid, addr, len).map_err(|source| Error::Sys {
        call: what,
        pid,
        source,
    })?;
    if bytes.len() != len {
        return Err(Error::Dump {
            pid,
            problem: format!("{what}: short read of scratch memory"),
        });
    }
    Ok(bytes)
}

fn word(bytes: &[u8], i: usize) -> u64 {
    bytes
        .get(i..i + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

fn read_process(inj: &Injector, scratch: u64) -> Result<Inside> {
    let pid = inj.pid();
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
        let raw = read_back(pid, scratch, 32, "process_vm_readv(sigaction)")?;
        if word(&raw, 0) != 0 {
            actions.push(SigAction {
                signo: signo as u32,
                handler: word(&raw, 0),
                flags: word(&raw, 8),
                restorer: word(&raw, 16),
                mask: word(&raw, 24),
            });
        }
    }
    let none = String::new;
    let n = inj.call(
        "modify_ldt",
        nr::x86_64::MODIFY_LDT,
        [0, scratch, LDT_BYTES, 0, 0, 0],
        none,
    )?;
    let ldt = if n > 0 {
        ldt::decode_table(&read_back(
            pid,
            scratch,
            n as usize,
            "process_vm_readv(ldt)",
        )?)
    } else {
        Vec::new()
    };
    let brk = inj.call("brk", nr::x86_64::BRK, [0; 6], none)?;
    inj.call(
        "prctl(PR_GET_CHILD_SUBREAPER)",
        nr::x86_64::PRCTL,
        [PR_GET_CHILD_SUBREAPER, scratch, 0, 0, 0, 0],
        none,
    )?;
    let child_subreaper = word(
        &read_back(pid, scratch, 8, "process_vm_readv(subreaper)")?,
        0,
    ) as u32
        != 0;
    debug!(%pid, actions = actions.len(), ldt = ldt.len(), brk = format!("{brk:#x}"), "process state read from inside");
    Ok(Inside {
        actions,
        ldt,
        brk,
        child_subreaper,
    })
}

fn read_thread(inj: &Injector, abi: Abi, scratch: u64, t: &mut ThreadImage) -> Result<()> {
    let tid = inj.pid();
    let none = String::new;
    inj.call(
        "sigaltstack",
        nr::x86_64::SIGALTSTACK,
        [0, scratch, 0, 0, 0, 0],
        none,
    )?;
    let ss = read_back(tid, scratch, 24, "process_vm_readv(stack_t)")?;
    let flags = word(&ss, 8) as u32;
    t.altstack = (flags & SS_DISABLE == 0).then(|| AltStack {
        sp: word(&ss, 0),
        flags,
        size: word(&ss, 16),
    });
    inj.call(
        "prctl(PR_GET_TID_ADDRESS)",
        nr::x86_64::PRCTL,
        [PR_GET_TID_ADDRESS, scratch, 0, 0, 0, 0],
        none,
    )?;
    t.clear_child_tid = word(
        &read_back(tid, scratch, 8, "process_vm_readv(tid address)")?,
        0,
    );
    t.robust_list = match abi {
        Abi::X86_64 => {
            inj.call(
                "get_robust_list",
                nr::x86_64::GET_ROBUST_LIST,
                [0, scratch, scratch + 8, 0, 0, 0],
                none,
            )?;
            let r = read_back(tid, scratch, 16, "process_vm_readv(robust list)")?;
            Some(RobustList {
                head: word(&r, 0),
                len: word(&r, 8),
            })
        }
        Abi::Ia32 => match inj.call_via(
            Entry::Compat,
            "get_robust_list (int 0x80)",
            nr::i386::GET_ROBUST_LIST,
            [0, scratch, scratch + 4, 0, 0, 0],
            none,
        ) {
            Ok(_) => {
                let r = read_back(tid, scratch, 8, "process_vm_readv(robust list)")?;
                let w = word(&r, 0);
                Some(RobustList {
                    head: w & 0xffff_ffff,
                    len: w >> 32,
                })
            }
            Err(e) => {
                warn!(%tid, "robust futex list not saved: {e}");
                None
            }
        },
    }
    .filter(|r| r.head != 0);
    debug!(%tid, altstack = t.altstack.is_some(), robust = t.robust_list.is_some(), "thread state read from inside");
    Ok(())
}

/// Finds `code` in an executable mapping of the task: its vDSO first (on
/// AMD every vDSO has a `syscall`, and the 32-bit one an `int 0x80`), else
/// any other.
fn find_code(pid: Pid, vmas: &[Vma], code: [u8; 2]) -> Option<u64> {
    let mut candidates: Vec<_> = vmas.iter().filter(|v| v.prot.exec && v.prot.read).collect();
    candidates.sort_by_key(|v| !matches!(&v.kind, VmaKind::Vdso { name } if name == "[vdso]"));
    candidates.into_iter().find_map(|v| {
        let len = v.len().min(16 << 20) as usize;
        let bytes = sys::read_remote(pid, v.start, len).ok()?;
        let i = bytes.windows(2).position(|w| w == code)?;
        Some(v.start + i as u64)
    })
}

//! Threads: creating the extra threads of a process with their tids, and
//! giving every thread, main one included, its own state: TLS slots, tid
//! address, robust futex list, rseq area, alternate stack, pending signals,
//! and last its extended state, registers and signal mask.

use tracing::{debug, warn};

use crate::arch::{Abi, Resume, nr};
use crate::error::{Error, Result};
use crate::image::ThreadImage;
use crate::inject::{Entry, Injector};
use crate::sys::{self, Pid};

use super::{Builder, stub};

const CLONE_THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM) as u64;
const CLONE_ARGS_LEN: u64 = 88;
const SS_AUTODISARM: u32 = 1 << 31;

/// An extra thread, created and stopped, with an injector of its own.
pub struct Thread<'a> {
    pub image: &'a ThreadImage,
    pub inj: Injector,
}

/// Creates every thread but the main one, each with its dumped tid, by
/// `clone3(CLONE_THREAD, set_tid)` run in the main thread. They start
/// stopped (the stub traces clones) and share the half-built address space.
pub fn create<'a>(b: &'a Builder) -> Result<Vec<Thread<'a>>> {
    let mut out = Vec::new();
    for t in b.task.threads.iter().skip(1) {
        let tid_at = b.put(128, &t.tid.0.to_le_bytes())?;
        let mut args = Vec::with_capacity(CLONE_ARGS_LEN as usize);
        // flags, pidfd, child_tid, parent_tid, exit_signal, stack,
        // stack_size, tls, set_tid, set_tid_size, cgroup
        for w in [CLONE_THREAD_FLAGS, 0, 0, 0, 0, 0, 0, 0, tid_at, 1, 0] {
            args.extend_from_slice(&w.to_le_bytes());
        }
        let at = b.put(0, &args)?;
        let got = b.inj.call(
            "clone3",
            nr::x86_64::CLONE3,
            [at, CLONE_ARGS_LEN, 0, 0, 0, 0],
            || format!("thread {}", t.tid),
        )?;
        if got != t.tid.0 as u64 {
            return Err(Error::Restore {
                pid: b.pid,
                problem: format!("thread {} was created as {got}", t.tid),
            });
        }
        let status = crate::error::wait(t.tid)?;
        if !libc::WIFSTOPPED(status) {
            return Err(Error::UnexpectedStop {
                pid: t.tid,
                doing: "creating a thread",
                status,
            });
        }
        let regs = sys::ptrace_getregs(t.tid).map_err(|source| Error::Ptrace {
            request: "PTRACE_GETREGS",
            pid: t.tid,
            source,
        })?;
        let inj = Injector::new(
            t.tid,
            regs,
            b.park + stub::SYSCALL_OFF,
            Some(b.park + stub::INT80_OFF),
        );
        debug!(pid = %b.pid, tid = %t.tid, "thread created");
        out.push(Thread { image: t, inj });
    }
    Ok(out)
}

/// Everything of one thread but its registers, run inside that thread.
pub fn restore_state(b: &Builder, inj: &Injector, t: &ThreadImage) -> Result<()> {
    let tid = t.tid;
    for d in &t.tls {
        sys::ptrace_set_thread_area(tid, d).map_err(|source| Error::Ptrace {
            request: "PTRACE_SET_THREAD_AREA",
            pid: tid,
            source,
        })?;
    }
    inj.call(
        "set_tid_address",
        nr::x86_64::SET_TID_ADDRESS,
        [t.clear_child_tid, 0, 0, 0, 0, 0],
        || format!("{:#x}", t.clear_child_tid),
    )?;
    if let Some(r) = &t.robust_list {
        let detail = || format!("head {:#x}", r.head);
        match b.task.abi {
            Abi::X86_64 => inj.call(
                "set_robust_list",
                nr::x86_64::SET_ROBUST_LIST,
                [r.head, r.len, 0, 0, 0, 0],
                detail,
            )?,
            Abi::Ia32 => inj.call_via(
                Entry::Compat,
                "set_robust_list (int 0x80)",
                nr::i386::SET_ROBUST_LIST,
                [r.head, r.len, 0, 0, 0, 0],
                detail,
            )?,
        };
    }
    if let Some(r) = &t.rseq {
        let ret = inj.raw(
            Entry::Native,
            nr::x86_64::RSEQ,
            [r.addr, r.len as u64, 0, r.sig as u64, 0, 0],
        )?;
        if ret < 0 {
            // The thread goes on without the kernel updating its rseq area
            // (glibc then sees a stale cpu number); it is not worth failing
            // the restore for.
            warn!(%tid, errno = -ret, "rseq area at {:#x} not registered again", r.addr);
        }
    }
    if let Some(ss) = &t.altstack {
        let mut s = Vec::with_capacity(24);
        s.extend_from_slice(&ss.sp.to_le_bytes());
        s.extend_from_slice(&((ss.flags & SS_AUTODISARM) as u64).to_le_bytes());
        s.extend_from_slice(&ss.size.to_le_bytes());
        let at = b.put(0, &s)?;
        inj.call(
            "sigaltstack",
            nr::x86_64::SIGALTSTACK,
            [at, 0, 0, 0, 0, 0],
            || format!("{:#x} size {:#x}", ss.sp, ss.size),
        )?;
    }
    let tgid = b.pid.0 as u64;
    for si in &t.pending {
        let at = b.put(0, &si.raw)?;
        let signo = si.signo as u64;
        inj.call(
            "rt_tgsigqueueinfo",
            nr::x86_64::RT_TGSIGQUEUEINFO,
            [tgid, tid.0 as u64, signo, at, 0, 0],
            || format!("signal {signo} to thread {tid}"),
        )?;
    }
    Ok(())
}

/// Loads a stopped thread's extended state, registers and signal mask and
/// lets it go. The thread must be at a syscall-exit stop (or its first
/// stop), so the registers written are the ones it returns to.
pub fn release(tid: Pid, t: &ThreadImage) -> Result<()> {
    release_with(tid, t, 0)
}

/// `release`, detaching with signal `sig` (SIGSTOP leaves it stopped).
pub fn release_with(tid: Pid, t: &ThreadImage, sig: i32) -> Result<()> {
    let ptrace_err = |request| {
        move |source| Error::Ptrace {
            request,
            pid: tid,
            source,
        }
    };
    sys::ptrace_set_xstate(tid, &t.xstate)
        .map_err(ptrace_err("PTRACE_SETREGSET(NT_X86_XSTATE)"))?;
    let regs = t.regs.with_restart_applied(Resume::Fresh);
    sys::ptrace_setregs(tid, &regs).map_err(ptrace_err("PTRACE_SETREGS"))?;
    sys::ptrace_set_sigmask(tid, t.blocked).map_err(ptrace_err("PTRACE_SETSIGMASK"))?;
    sys::ptrace_detach(tid, sig).map_err(ptrace_err("PTRACE_DETACH"))?;
    debug!(%tid, rip = format!("{:#x}", regs.rip), cs = format!("{:#x}", regs.cs), "released");
    Ok(())
}

//! Restoring everything but memory and registers: mm fields and exe link,
//! files, limits, personality, segments and signals.

use std::path::Path;

use tracing::{debug, warn};

use crate::arch::{Abi, nr};
use crate::error::{Error, Result};
use crate::image::{FdKind, SigAction, TaskImage, VmaKind};
use crate::inject::Entry;
use crate::sys::Pid;

use super::Builder;

const PR_SET_NAME: u64 = 15;
const PR_SET_CHILD_SUBREAPER: u64 = 36;
const PR_SET_MM: u64 = 35;
const PR_SET_MM_MAP: u64 = 14;
const PRCTL_MM_MAP_LEN: u64 = 104;
const MODIFY_LDT_WRITE: u64 = 0x11;

/// Checks, before any process exists, that every file the image refers to
/// can be found.
pub fn check_files_exist(task: &TaskImage) -> Result<()> {
    let missing = |path: &Path, what: &str| -> Result<()> {
        std::fs::metadata(path)
            .map(drop)
            .map_err(|e| Error::Restore {
                pid: task.pid,
                problem: format!("{what} {} cannot be opened: {e}", path.display()),
            })
    };
    missing(&task.mm.exe, "executable")?;
    for v in &task.vmas {
        if let VmaKind::File { path, size, .. } = &v.kind {
            missing(path, "mapped file")?;
            // A private mapping's clean pages come from the file: if it
            // changed size, they are not what the process had.
            let now = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            if !v.shared && now != *size {
                return Err(Error::Restore {
                    pid: task.pid,
                    problem: format!(
                        "mapped file {} changed since the dump ({size} bytes then, {now} now)",
                        path.display()
                    ),
                });
            }
        }
    }
    for f in task
        .files
        .fds
        .iter()
        .filter(|f| !matches!(f.kind, FdKind::Pipe | FdKind::Socket))
    {
        missing(&f.path, &format!("file of fd {}", f.fd))?;
    }
    missing(&task.files.cwd, "working directory")
}

/// Sets code/data/brk/stack/args/env bounds, the auxv and the exe link in
/// one `PR_SET_MM_MAP`, and the task's name.
pub fn set_mm(b: &Builder) -> Result<()> {
    let mm = &b.task.mm;
    let exe_fd = b.open(&mm.exe, (libc::O_RDONLY | libc::O_CLOEXEC) as u32)?;
    let auxv_at = b.scratch() + 256;
    let mut map = Vec::with_capacity(PRCTL_MM_MAP_LEN as usize);
    for w in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        auxv_at,
    ] {
        map.extend_from_slice(&w.to_le_bytes());
    }
    map.extend_from_slice(&(mm.auxv.len() as u32).to_le_bytes());
    map.extend_from_slice(&(exe_fd as u32).to_le_bytes());
    let at = b.put(0, &map)?;
    b.put(256, &mm.auxv)?;
    let result = b.inj.call(
        "prctl(PR_SET_MM_MAP)",
        nr::x86_64::PRCTL,
        [PR_SET_MM, PR_SET_MM_MAP, at, PRCTL_MM_MAP_LEN, 0, 0],
        || format!("brk {:#x}, exe {}", mm.brk, mm.exe.display()),
    );
    b.close(exe_fd)?;
    result?;
    let mut name = b.task.comm.as_bytes().to_vec();
    name.truncate(15);
    name.push(0);
    let at = b.put(0, &name)?;
    b.inj.call(
        "prctl(PR_SET_NAME)",
        nr::x86_64::PRCTL,
        [PR_SET_NAME, at, 0, 0, 0, 0],
        || b.task.comm.clone(),
    )?;
    Ok(())
}

/// Closes what the stub inherited from cryopod, reopens the dumped fds at
/// their numbers with their flags and offsets, then cwd, root and umask.
pub fn files(b: &Builder, shared: &mut super::files::Shared) -> Result<()> {
    let fd_dir = format!("/proc/{}/fd", b.pid);
    let inherited: Vec<u64> = std::fs::read_dir(&fd_dir)
        .map_err(|e| Error::proc(&fd_dir, e))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let courier = shared.courier_fd() as u64;
    if b.task.files.fds.iter().any(|f| f.fd as u64 == courier) {
        return Err(Error::Restore {
            pid: b.pid,
            problem: format!("fd {courier} is the one cryopod hands files through; not supported"),
        });
    }
    for fd in inherited.into_iter().filter(|fd| *fd != courier) {
        b.close(fd)?;
    }
    for f in &b.task.files.fds {
        let cloexec = f.flags & libc::O_CLOEXEC as u32;
        if let Some(src) = f.dup_of {
            let (src, target) = (src as u64, f.fd as u64);
            b.inj.call(
                "dup3",
                nr::x86_64::DUP3,
                [src, target, cloexec as u64, 0, 0, 0],
                || format!("fd {src} to {target} (shared open file)"),
            )?;
            continue;
        }
        if let Some(id) = f.shared {
            shared.give(b, id, f.fd, cloexec != 0)?;
            continue;
        }
        let strip = (libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC) as u32;
        let open_flags = (f.flags & !strip) | libc::O_NOCTTY as u32;
        let tmp = b.open(&f.path, open_flags)?;
        let target = f.fd as u64;
        if tmp != target {
            b.inj.call(
                "dup3",
                nr::x86_64::DUP3,
                [tmp, target, cloexec as u64, 0, 0, 0],
                || format!("fd {tmp} to {target}"),
            )?;
            b.close(tmp)?;
        }
        if f.kind != FdKind::CharDevice {
            b.inj.call(
                "lseek",
                nr::x86_64::LSEEK,
                [target, f.pos, libc::SEEK_SET as u64, 0, 0, 0],
                || format!("fd {target} to {}", f.pos),
            )?;
        }
        debug!(pid = %b.pid, fd = f.fd, path = %f.path.display(), "fd reopened");
    }
    b.close(courier)?;
    let files = &b.task.files;
    let at = b.put_path(&files.cwd)?;
    b.inj
        .call("chdir", nr::x86_64::CHDIR, [at, 0, 0, 0, 0, 0], || {
            files.cwd.display().to_string()
        })?;
    if files.root != Path::new("/") {
        let at = b.put_path(&files.root)?;
        b.inj
            .call("chroot", nr::x86_64::CHROOT, [at, 0, 0, 0, 0, 0], || {
                files.root.display().to_string()
            })?;
    }
    b.inj.call(
        "umask",
        nr::x86_64::UMASK,
        [files.umask as u64, 0, 0, 0, 0, 0],
        String::new,
    )?;
    Ok(())
}

/// Resource limits and personality. A limit above what cryopod may grant
/// (raising a hard limit needs CAP_SYS_RESOURCE) is reported and left as
/// inherited; everything else is set.
pub fn limits_and_personality(b: &Builder) -> Result<()> {
    for l in &b.task.rlimits {
        let mut bytes = l.soft.to_le_bytes().to_vec();
        bytes.extend_from_slice(&l.hard.to_le_bytes());
        let at = b.put(0, &bytes)?;
        let ret = b.inj.raw(
            Entry::Native,
            nr::x86_64::PRLIMIT64,
            [0, l.resource as u64, at, 0, 0, 0],
        )?;
        if ret < 0 {
            warn!(
                pid = %b.pid,
                resource = l.resource,
                soft = l.soft,
                hard = l.hard,
                errno = -ret,
                "rlimit not restored (raising a hard limit needs CAP_SYS_RESOURCE)"
            );
        }
    }
    if b.task.child_subreaper {
        b.inj.call(
            "prctl(PR_SET_CHILD_SUBREAPER)",
            nr::x86_64::PRCTL,
            [PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0, 0],
            String::new,
        )?;
    }
    b.inj.call(
        "personality",
        nr::x86_64::PERSONALITY,
        [b.task.personality as u64, 0, 0, 0, 0, 0],
        || format!("{:#x}", b.task.personality),
    )?;
    Ok(())
}

/// LDT entries, through modify_ldt inside the task. Segment registers
/// themselves come with each thread's registers.
pub fn ldt(b: &Builder) -> Result<()> {
    for d in &b.task.ldt {
        let at = b.put(0, &d.as_bytes())?;
        b.inj.call(
            "modify_ldt",
            nr::x86_64::MODIFY_LDT,
            [MODIFY_LDT_WRITE, at, 16, 0, 0, 0],
            || format!("LDT entry {}", d.entry_number),
        )?;
    }
    Ok(())
}

/// Signal actions. An ia32 task's actions go through `int 0x80`, which is
/// what makes the kernel build 32-bit frames for its handlers.
pub fn signal_actions(b: &Builder) -> Result<()> {
    // The stub inherited cryopod's ignored signals (an exec keeps SIG_IGN);
    // those the task had at default go back to default.
    let status_path = format!("/proc/{}/status", b.pid);
    let status = std::fs::read_to_string(&status_path).map_err(|e| Error::proc(&status_path, e))?;
    let ignored = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let defaults = (1..=64u32)
        .filter(|s| ignored & (1 << (s - 1)) != 0)
        .filter(|s| !b.task.signals.actions.iter().any(|a| a.signo == *s))
        .map(|signo| SigAction {
            signo,
            handler: 0,
            flags: 0,
            restorer: 0,
            mask: 0,
        });
    let actions: Vec<SigAction> = defaults
        .chain(b.task.signals.actions.iter().copied())
        .collect();
    for a in &actions {
        match b.task.abi {
            Abi::X86_64 => {
                let mut s = Vec::with_capacity(32);
                for w in [a.handler, a.flags, a.restorer, a.mask] {
                    s.extend_from_slice(&w.to_le_bytes());
                }
                let at = b.put(0, &s)?;
                b.inj.call(
                    "rt_sigaction",
                    nr::x86_64::RT_SIGACTION,
                    [a.signo as u64, at, 0, 8, 0, 0],
                    || format!("signal {}", a.signo),
                )?;
            }
            Abi::Ia32 => {
                let mut s = Vec::with_capacity(20);
                for w in [a.handler as u32, a.flags as u32, a.restorer as u32] {
                    s.extend_from_slice(&w.to_le_bytes());
                }
                s.extend_from_slice(&a.mask.to_le_bytes());
                let at = b.put(0, &s)?;
                b.inj.call_via(
                    Entry::Compat,
                    "rt_sigaction (int 0x80)",
                    nr::i386::RT_SIGACTION,
                    [a.signo as u64, at, 0, 8, 0, 0],
                    || format!("signal {}", a.signo),
                )?;
            }
        }
    }
    Ok(())
}

/// Queues the process-wide pending signals again, oldest first, while
/// every signal is still blocked; the threads' own masks are set last.
pub fn pending_signals(b: &Builder) -> Result<()> {
    let pid = b.pid.0 as u64;
    for si in &b.task.signals.pending_process {
        let at = b.put(0, &si.raw)?;
        let signo = si.signo as u64;
        b.inj.call(
            "rt_sigqueueinfo",
            nr::x86_64::RT_SIGQUEUEINFO,
            [pid, signo, at, 0, 0, 0],
            || format!("signal {signo}"),
        )?;
    }
    Ok(())
}

/// Sessions and process groups, in two passes. The first runs right after
/// the process is made, before its children are forked (they inherit):
/// a session leader calls setsid(), a group leader setpgid(0, 0). The
/// second, once every process exists, joins the other groups.
///
/// A group or session whose leader is outside the tree (the shell that
/// started the root) is the one cryopod restore runs in.
pub fn session(b: &Builder, first: bool, tree: &[Pid]) -> Result<()> {
    let t = b.task;
    let none = String::new;
    if first {
        if t.sid == t.pid {
            b.inj.call("setsid", nr::x86_64::SETSID, [0; 6], none)?;
        } else if t.pgid == t.pid {
            b.inj
                .call("setpgid", nr::x86_64::SETPGID, [0, 0, 0, 0, 0, 0], none)?;
        }
        return Ok(());
    }
    if t.pgid == t.pid || !tree.contains(&t.pgid) {
        if t.pgid != t.pid {
            debug!(pid = %t.pid, pgid = %t.pgid, "process group leader outside the tree: left in the inherited group");
        }
        return Ok(());
    }
    b.inj.call(
        "setpgid",
        nr::x86_64::SETPGID,
        [0, t.pgid.0 as u64, 0, 0, 0, 0],
        || format!("process group {}", t.pgid),
    )?;
    Ok(())
}

/// Takes every signal queued to the process while it was being made.
pub fn drain_signals(b: &Builder) -> Result<()> {
    let set = b.put(0, &u64::MAX.to_le_bytes())?;
    let zero = b.put(64, &[0u8; 16])?;
    for _ in 0..128 {
        let ret = b.inj.raw(
            Entry::Native,
            nr::x86_64::RT_SIGTIMEDWAIT,
            [set, 0, zero, 8, 0, 0],
        )?;
        if ret <= 0 {
            return Ok(());
        }
        debug!(pid = %b.pid, signo = ret, "signal raised while restoring dropped");
    }
    Ok(())
}

/// Makes a freshly forked child exit with the zombie's status; its parent
/// (still stopped) will find it unreaped, as it was.
pub fn make_zombie(inj: &crate::inject::Injector, z: &crate::image::Zombie) -> Result<()> {
    let code = if libc::WIFEXITED(z.status) {
        libc::WEXITSTATUS(z.status)
    } else {
        // Shortcoming: a zombie killed by a signal comes back as one that
        // exited with 128 + the signal; its parent sees WIFEXITED.
        warn!(pid = %z.pid, status = z.status, "zombie killed by a signal is restored as exited");
        128 + libc::WTERMSIG(z.status)
    };
    let none = String::new;
    if z.sid == z.pid {
        inj.call("setsid", nr::x86_64::SETSID, [0; 6], none)?;
    } else if z.pgid == z.pid {
        inj.call("setpgid", nr::x86_64::SETPGID, [0, 0, 0, 0, 0, 0], none)?;
    }
    inj.exit(code as u64)
}

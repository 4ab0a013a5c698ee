//! `cryopod restore`: recreate a dumped process with its pid, memory,
//! registers, signals and files.
//!
//! The design (see docs/DESIGN.md): cryopod starts a stub executable of the
//! task's own width as the dumped pid and then builds the task from outside,
//! with ptrace and syscalls injected into it. No code of ours runs inside the
//! task, and one 64-bit binary restores tasks of both widths.

mod memory;
pub(crate) mod spawn;
mod state;
pub mod stub;
mod threads;

use std::path::PathBuf;
use std::time::Instant;

use tracing::info;

use crate::arch::{Abi, nr};
use crate::error::{Error, Result};
use crate::image::{self, TaskImage};
use crate::inject::{Entry, Injector};
use crate::sys::{self, Pid};

pub struct RestoreOptions {
    pub dir: PathBuf,
    pub detached: bool,
    pub pidfile: Option<PathBuf>,
}

/// How a restore ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The task runs on its own (`--restore-detached`).
    Detached(Pid),
    /// The task ran and exited with this shell-style status.
    Exited(i32),
}

/// The parking area: a code page with the stub's instructions, then scratch
/// memory for the arguments of injected syscalls. It lies in a hole of the
/// dumped address space, below 4 GiB so 32-bit syscalls can point into it,
/// and is the last thing unmapped.
const PARK_LEN: u64 = 0x11000;
const SCRATCH_OFF: u64 = 0x1000;

/// A task under construction.
pub(crate) struct Builder<'a> {
    pub pid: Pid,
    pub task: &'a TaskImage,
    pub inj: Injector,
    pub park: u64,
}

impl Builder<'_> {
    pub fn scratch(&self) -> u64 {
        self.park + SCRATCH_OFF
    }

    /// Copies `bytes` into scratch memory at `offset`; returns the address.
    pub fn put(&self, offset: u64, bytes: &[u8]) -> Result<u64> {
        let addr = self.scratch() + offset;
        if offset + bytes.len() as u64 > PARK_LEN - SCRATCH_OFF {
            return Err(Error::Restore {
                pid: self.pid,
                problem: format!("{} bytes do not fit the scratch area", bytes.len()),
            });
        }
        sys::write_remote(self.pid, addr, bytes).map_err(|source| Error::Sys {
            call: "process_vm_writev(scratch)",
            pid: self.pid,
            source,
        })?;
        Ok(addr)
    }

    /// Copies a path as a C string into scratch memory.
    pub fn put_path(&self, path: &std::path::Path) -> Result<u64> {
        use std::os::unix::ffi::OsStrExt;
        let mut bytes = path.as_os_str().as_bytes().to_vec();
        bytes.push(0);
        self.put(0, &bytes)
    }

    /// Opens `path` inside the task; returns the new fd. ia32 tasks open
    /// through the 32-bit entry, so flags (no forced O_LARGEFILE) come out
    /// as the task had them.
    pub fn open(&self, path: &std::path::Path, flags: u32) -> Result<u64> {
        let at = self.put_path(path)?;
        let at_fdcwd = libc::AT_FDCWD as i64 as u64;
        let detail = || path.display().to_string();
        match self.task.abi {
            Abi::X86_64 => self.inj.call(
                "openat",
                nr::x86_64::OPENAT,
                [at_fdcwd, at, flags as u64, 0, 0, 0],
                detail,
            ),
            Abi::Ia32 => self.inj.call_via(
                Entry::Compat,
                "openat (int 0x80)",
                nr::i386::OPENAT,
                [at_fdcwd & 0xffff_ffff, at, flags as u64, 0, 0, 0],
                detail,
            ),
        }
    }

    pub fn close(&self, fd: u64) -> Result<()> {
        self.inj
            .call("close", nr::x86_64::CLOSE, [fd, 0, 0, 0, 0, 0], || {
                format!("fd {fd}")
            })
            .map(drop)
    }
}

/// Restores the image in `opts.dir`.
///
/// Order, and why: everything in the image is read and checked before any
/// process exists; then the stub is started as the dumped pid; a parking
/// page is mapped and the stub's own mappings removed; the vDSO is placed,
/// then every mapping made and filled, then protections set; the mm fields
/// (which need the final mappings and no stub mapped) next; files, limits,
/// personality, segments and signal actions after that; registers last, at
/// the exit of the syscall that unmaps the parking page, so the task's first
/// user instruction is its own.
pub fn restore(opts: &RestoreOptions) -> Result<Outcome> {
    let started = Instant::now();
    let inv = image::read_inventory(&opts.dir)?;
    if inv.tasks.len() != 1 || inv.tasks[0] != inv.root_pid {
        return Err(Error::image(
            image::inventory_path(&opts.dir),
            format!(
                "holds {} tasks; this cryopod restores single processes",
                inv.tasks.len()
            ),
        ));
    }
    let pid = inv.root_pid;
    let task = image::read_task(&opts.dir, pid)?;
    let pages = image::open_pages(&opts.dir, &task)?;
    state::check_files_exist(&task)?;
    if sys::pid_exists(pid) {
        return Err(Error::PidInUse(pid));
    }
    info!(%pid, abi = task.abi.name(), comm = %task.comm, "restoring");

    let (child, code) = spawn::spawn(Some(pid), task.abi)?;
    sys::ptrace_set_sigmask(pid, !0).map_err(|source| Error::Ptrace {
        request: "PTRACE_SETSIGMASK",
        pid,
        source,
    })?;
    let regs = sys::ptrace_getregs(pid).map_err(|source| Error::Ptrace {
        request: "PTRACE_GETREGS",
        pid,
        source,
    })?;
    let inj = Injector::new(
        pid,
        regs,
        code + stub::SYSCALL_OFF,
        Some(code + stub::INT80_OFF),
    );
    let park = memory::parking_address(&task, pid)?;
    let mut b = Builder {
        pid,
        task: &task,
        inj,
        park,
    };
    memory::park(&mut b)?;
    memory::clear_stub(&b)?;
    memory::map_vdso(&b)?;
    let made = memory::map_all(&b)?;
    memory::fill_pages(&b, &pages, &made)?;
    memory::protect(&b, &made)?;
    state::set_mm(&b)?;
    state::files(&b)?;
    state::limits_and_personality(&b)?;
    state::ldt(&b)?;
    state::signal_actions(&b)?;
    state::pending_signals(&b)?;
    let extra = threads::create(&b)?;
    let main = task
        .main_thread()
        .ok_or_else(|| Error::image(image::task_path(&opts.dir, pid), "no threads"))?;
    threads::restore_state(&b, &b.inj, main)?;
    for t in &extra {
        threads::restore_state(&b, &t.inj, t.image)?;
    }
    for t in &extra {
        threads::release(t.inj.pid(), t.image)?;
    }
    finish(&b, main)?;
    let pid = child.disarm();
    info!(%pid, ms = started.elapsed().as_secs_f64() * 1e3, "restored");

    if let Some(path) = &opts.pidfile {
        std::fs::write(path, format!("{pid}\n")).map_err(|e| Error::proc(path, e))?;
    }
    if opts.detached {
        return Ok(Outcome::Detached(pid));
    }
    let status = sys::waitpid(pid, 0).map_err(|source| Error::Sys {
        call: "waitpid",
        pid,
        source,
    })?;
    Ok(Outcome::Exited(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }))
}

/// Unmaps the parking page and, stopped at the exit of that very syscall,
/// loads the main thread's own extended state, registers and signal mask,
/// then lets it go: the first user instruction it runs is its own.
fn finish(b: &Builder, main: &image::ThreadImage) -> Result<()> {
    b.inj.call(
        "munmap",
        nr::x86_64::MUNMAP,
        [b.park, PARK_LEN, 0, 0, 0, 0],
        || format!("parking area at {:#x}", b.park),
    )?;
    threads::release(b.pid, main)
}

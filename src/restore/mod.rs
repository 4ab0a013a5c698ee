//! `cryopod restore`: recreate a dumped process with its pid, memory,
//! registers, signals and files.
//!
//! The design (see docs/DESIGN.md): cryopod starts a stub executable of the
//! task's own width as the dumped pid and then builds the task from outside,
//! with ptrace and syscalls injected into it. No code of ours runs inside the
//! task, and one 64-bit binary restores tasks of both widths.

mod files;
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

impl<'a> Builder<'a> {
    /// Takes over a freshly exec'd stub (code at `code`): blocks its signals
    /// and parks it.
    fn new(task: &'a TaskImage, pid: Pid, code: u64, park: u64) -> Result<Builder<'a>> {
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
        Builder::with_injector(task, inj, park)
    }

    /// Takes over a stopped stub: blocks its signals and maps its parking
    /// page at `park`.
    fn with_injector(task: &'a TaskImage, inj: Injector, park: u64) -> Result<Builder<'a>> {
        let mut b = Builder::inherited(task, inj, park)?;
        memory::park(&mut b)?;
        Ok(b)
    }

    /// Takes over a child forked without exec, which inherited its parent's
    /// parking page (and code) at `park`.
    fn inherited(task: &'a TaskImage, inj: Injector, park: u64) -> Result<Builder<'a>> {
        let pid = inj.pid();
        sys::ptrace_set_sigmask(pid, !0).map_err(|source| Error::Ptrace {
            request: "PTRACE_SETSIGMASK",
            pid,
            source,
        })?;
        Ok(Builder {
            pid,
            task,
            inj,
            park,
        })
    }

    /// The main thread's image (read_task checked there is one).
    pub fn main(&self) -> &'a image::ThreadImage {
        &self.task.threads[0]
    }

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
/// process exists. Then the processes are made, parents first, and each
/// one's memory built before its children are forked: the root as
/// cryopod's child with its dumped pid; every other process forked from its
/// restored parent with its pid, keeping the parent's memory (so pages
/// shared copy-on-write stay shared) when it has the parent's width, or
/// exec'ing the stub of its own width when not. Sessions and groups are set
/// as processes are made; zombies are forked and made to exit. Then each
/// process gets the rest: the mm fields (which need the final mappings and
/// no stub mapped); files (after every fork, so the handover socket and
/// stub memfds are still there to inherit); limits, personality, LDT,
/// signal actions; its other threads and every thread's own state. Last,
/// children before parents, every thread gets its registers, the main
/// thread at the exit of the syscall that unmaps the parking page, so the
/// first user instruction each runs is its own.
pub fn restore(opts: &RestoreOptions) -> Result<Outcome> {
    let started = Instant::now();
    let inv = image::read_inventory(&opts.dir)?;
    let inv_path = image::inventory_path(&opts.dir);
    let mut tasks = Vec::with_capacity(inv.tasks.len());
    for pid in &inv.tasks {
        let task = image::read_task(&opts.dir, *pid)?;
        let pages = image::open_pages(&opts.dir, &task)?;
        state::check_files_exist(&task)?;
        tasks.push((task, pages));
    }
    check_tree(&inv, &tasks.iter().map(|(t, _)| t).collect::<Vec<_>>())
        .map_err(|problem| Error::image(&inv_path, problem))?;
    let (orphan_groups, orphan_sessions) =
        orphans(&inv, &tasks.iter().map(|(t, _)| t).collect::<Vec<_>>())
            .map_err(|problem| Error::image(&inv_path, problem))?;
    for pid in inv
        .tasks
        .iter()
        .chain(inv.zombies.iter().map(|z| &z.pid))
        .chain(orphan_groups.iter())
        .chain(orphan_sessions.iter())
    {
        if sys::pid_exists(*pid) {
            return Err(Error::PidInUse(*pid));
        }
    }
    let root = &tasks[0].0;
    info!(pid = %root.pid, processes = tasks.len(), abi = root.abi.name(), comm = %root.comm, "restoring");

    // The pid file must be writable before any process exists: failing to
    // write it afterwards would leave a restored process nobody knows of.
    if let Some(path) = &opts.pidfile {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| Error::PidFile {
                path: path.clone(),
                source,
            })?;
    }
    let mut shared = files::Shared::new(&inv)?;
    let mut family = spawn::Family::new();
    let stubs = spawn::Stubs::new()?;
    let mut builders: Vec<Builder> = Vec::with_capacity(tasks.len());
    let mut shmem = memory::Shmem::new();
    let images: Vec<&TaskImage> = tasks.iter().map(|(t, _)| t).collect();
    let mut park = 0;
    let mut session_standins: Vec<(Injector, usize)> = Vec::new();
    for (i, (task, pages)) in tasks.iter().enumerate() {
        let parent = builders.iter().position(|p| p.pid == task.ppid && i > 0);
        let b = match parent {
            None => {
                let (pid, code) = spawn::spawn(&mut family, &stubs, Some(task.pid), task.abi)?;
                park = memory::parking_address(&images, pid)?;
                let b = Builder::new(task, pid, code, park)?;
                state::session(&b, true, &inv.tasks)?;
                memory::build_fresh(&b, pages, &mut shmem)?;
                b
            }
            Some(pi) => {
                let parent = &builders[pi];
                let mut inj = if orphan_sessions.contains(&task.sid) {
                    // A session whose leader is gone: a stand-in with the
                    // leader's pid, forked from this parent, makes the
                    // session and forks the member as the parent's child.
                    if !session_standins
                        .iter()
                        .any(|(s, _): &(Injector, usize)| s.pid() == task.sid)
                    {
                        let s = spawn::fork(&mut family, &parent.inj, parent.scratch(), task.sid)?;
                        s.call("setsid", nr::x86_64::SETSID, [0; 6], || {
                            format!("stand-in leader of session {}", task.sid)
                        })?;
                        session_standins.push((s, pi));
                    }
                    let (s, spi) = session_standins
                        .iter()
                        .find(|(s, _)| s.pid() == task.sid)
                        .ok_or_else(|| {
                            Error::image(&inv_path, format!("no stand-in for session {}", task.sid))
                        })?;
                    if *spi != pi {
                        return Err(Error::image(
                            &inv_path,
                            format!(
                                "members of session {} (whose leader is gone) have different parents",
                                task.sid
                            ),
                        ));
                    }
                    spawn::fork_with(
                        &mut family,
                        s,
                        parent.scratch(),
                        task.pid,
                        libc::CLONE_PARENT as u64,
                    )?
                } else {
                    spawn::fork(&mut family, &parent.inj, parent.scratch(), task.pid)?
                };
                if task.abi == parent.task.abi {
                    // Same width: keep what the parent's memory gives, so
                    // copy-on-write sharing survives.
                    let b = Builder::inherited(task, inj, park)?;
                    state::session(&b, true, &inv.tasks)?;
                    memory::build_inherited(&b, parent.task, &tasks[pi].1, pages, &mut shmem)?;
                    b
                } else {
                    let code = spawn::exec_stub(&inj, &stubs, parent.scratch(), task.abi)?;
                    inj.rebase()?;
                    inj.set_code(code + stub::SYSCALL_OFF, Some(code + stub::INT80_OFF));
                    let b = Builder::with_injector(task, inj, park)?;
                    state::session(&b, true, &inv.tasks)?;
                    memory::build_fresh(&b, pages, &mut shmem)?;
                    b
                }
            }
        };
        builders.push(b);
    }
    for z in &inv.zombies {
        let parent = builders.iter().find(|p| p.pid == z.ppid).ok_or_else(|| {
            Error::image(
                &inv_path,
                format!("zombie {} has no parent {} in the image", z.pid, z.ppid),
            )
        })?;
        let inj = spawn::fork(&mut family, &parent.inj, parent.scratch(), z.pid)?;
        state::make_zombie(&inj, z)?;
    }
    // A group whose leader is gone gets a stand-in with the leader's pid,
    // forked from a member's parent (so it is in the members' session); it
    // founds the group, the members join, and it exits and is reaped.
    let mut standins: Vec<(Injector, &Builder)> = session_standins
        .into_iter()
        .map(|(s, pi)| (s, &builders[pi]))
        .collect();
    for g in &orphan_groups {
        let Some(parent) = tasks
            .iter()
            .find(|(t, _)| t.pgid == *g)
            .and_then(|(m, _)| builders.iter().find(|p| p.pid == m.ppid))
        else {
            continue;
        };
        let inj = spawn::fork(&mut family, &parent.inj, parent.scratch(), *g)?;
        inj.call("setpgid", nr::x86_64::SETPGID, [0, 0, 0, 0, 0, 0], || {
            format!("stand-in leader of group {g}")
        })?;
        standins.push((inj, parent));
    }
    let groups: Vec<Pid> = inv
        .tasks
        .iter()
        .copied()
        .chain(inv.zombies.iter().map(|z| z.pid))
        .chain(orphan_groups.iter().copied())
        .chain(orphan_sessions.iter().copied())
        .collect();
    for b in &builders {
        state::session(b, false, &groups)?;
    }
    for (inj, parent) in standins {
        let g = inj.pid();
        inj.exit(0)?;
        parent.inj.call(
            "wait4",
            nr::x86_64::WAIT4,
            [g.0 as u64, 0, 0, 0, 0, 0],
            || format!("stand-in group leader {g}"),
        )?;
    }
    // Signals raised while the tree was made (SIGCHLD of zombies and
    // stand-ins) are not the processes' own: drop them before the saved
    // pending signals are queued again.
    for b in &builders {
        state::drain_signals(b)?;
    }

    let mut ready = Vec::with_capacity(builders.len());
    for b in &builders {
        ready.push(build(b, &mut shared)?);
    }
    for (b, extra) in builders.iter().zip(ready).rev() {
        for t in &extra {
            threads::release(t.inj.pid(), t.image)?;
        }
        finish(b)?;
    }
    family.disarm();
    let pid = root.pid;
    info!(%pid, ms = started.elapsed().as_secs_f64() * 1e3, "restored");

    if let Some(path) = &opts.pidfile {
        std::fs::write(path, format!("{pid}\n")).map_err(|source| Error::PidFile {
            path: path.clone(),
            source,
        })?;
    }
    if opts.detached {
        return Ok(Outcome::Detached(pid));
    }
    let status = crate::error::wait(pid)?;
    Ok(Outcome::Exited(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }))
}

/// Process groups and sessions of the tree whose leader is gone: neither a
/// process nor a zombie of the image, nor the root's own group or session,
/// which are led from outside the tree. A session's stand-in leads its
/// group of the same id too, so such groups are not listed twice.
fn orphans(
    inv: &image::Inventory,
    tasks: &[&TaskImage],
) -> std::result::Result<(Vec<Pid>, Vec<Pid>), String> {
    let root = tasks.first().ok_or("no tasks")?;
    let known = |p: &Pid| inv.tasks.contains(p) || inv.zombies.iter().any(|z| z.pid == *p);
    let mut groups: Vec<Pid> = Vec::new();
    let mut sessions: Vec<Pid> = Vec::new();
    for t in tasks.iter().skip(1) {
        if t.sid != root.sid && !known(&t.sid) && !sessions.contains(&t.sid) {
            sessions.push(t.sid);
        }
    }
    for t in tasks.iter().skip(1) {
        if t.pgid != root.pgid
            && !known(&t.pgid)
            && !groups.contains(&t.pgid)
            && !sessions.contains(&t.pgid)
        {
            groups.push(t.pgid);
        }
    }
    Ok((groups, sessions))
}

/// The tree in the inventory is whole: the first task is the root, and
/// every other task and zombie comes after its parent.
fn check_tree(inv: &image::Inventory, tasks: &[&TaskImage]) -> std::result::Result<(), String> {
    if tasks.first().map(|t| t.pid) != Some(inv.root_pid) {
        return Err("the first task is not the root".into());
    }
    for (i, t) in tasks.iter().enumerate().skip(1) {
        if !tasks[..i].iter().any(|p| p.pid == t.ppid) {
            return Err(format!("task {} comes before its parent {}", t.pid, t.ppid));
        }
    }
    for z in &inv.zombies {
        if !tasks.iter().any(|p| p.pid == z.ppid) {
            return Err(format!(
                "zombie {} has no parent {} in the image",
                z.pid, z.ppid
            ));
        }
    }
    Ok(())
}

/// Builds everything of one process but its memory (made already) and its
/// registers. Returns its other threads, created and stopped.
fn build<'a>(b: &'a Builder, shared: &mut files::Shared) -> Result<Vec<threads::Thread<'a>>> {
    state::set_mm(b)?;
    state::files(b, shared)?;
    state::limits_and_personality(b)?;
    state::ldt(b)?;
    state::signal_actions(b)?;
    state::pending_signals(b)?;
    let extra = threads::create(b)?;
    threads::restore_state(b, &b.inj, b.main())?;
    for t in &extra {
        threads::restore_state(b, &t.inj, t.image)?;
    }
    Ok(extra)
}

/// Unmaps the parking page and, stopped at the exit of that very syscall,
/// loads the main thread's own extended state, registers and signal mask,
/// then lets it go: the first user instruction it runs is its own.
fn finish(b: &Builder) -> Result<()> {
    b.inj.call(
        "munmap",
        nr::x86_64::MUNMAP,
        [b.park, PARK_LEN, 0, 0, 0, 0],
        || format!("parking area at {:#x}", b.park),
    )?;
    // A process that was stopped goes back to being stopped.
    let sig = if b.task.stopped { libc::SIGSTOP } else { 0 };
    threads::release_with(b.pid, b.main(), sig)
}

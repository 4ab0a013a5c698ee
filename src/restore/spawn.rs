//! Creating the new processes: the root with `clone3(set_tid)` from cryopod,
//! every other one forked (`clone3(set_tid)` injected) from its restored
//! parent so that it has the right parent, each then exec'ing the stub of
//! its own width. A guard kills them all if restore fails.

use std::fs::File;
use std::os::fd::AsRawFd;

use tracing::debug;

use crate::arch::{Abi, nr};
use crate::error::{Error, Result};
use crate::inject::Injector;
use crate::sys::{self, Pid};

use super::stub;

const OPTIONS: u64 = sys::PTRACE_O_TRACESYSGOOD
    | sys::PTRACE_O_EXITKILL
    | sys::PTRACE_O_TRACECLONE
    | sys::PTRACE_O_TRACEFORK
    | sys::PTRACE_O_TRACEEXEC;
const CLONE_ARGS_LEN: u64 = 88;

/// Every process made so far. Dropped while armed, it kills and reaps them
/// all: a failed restore leaves no process behind.
#[derive(Default)]
pub struct Family {
    pids: Vec<Pid>,
    armed: bool,
}

impl Family {
    pub fn new() -> Family {
        Family {
            pids: Vec::new(),
            armed: true,
        }
    }

    /// The tree is complete and released: stop guarding it.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Family {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        for pid in &self.pids {
            let _ = sys::kill(*pid, libc::SIGKILL);
        }
        for pid in self.pids.iter().rev() {
            let _ = sys::waitpid(*pid, 0);
            debug!(%pid, "half-made process killed");
        }
    }
}

/// The two stub executables, in memfds that every stub inherits (they are
/// not close-on-exec) so that a forked stub can exec the other width.
pub struct Stubs {
    s64: File,
    s32: File,
}

impl Stubs {
    pub fn new() -> Result<Stubs> {
        let make = |abi| {
            sys::memfd_with(c"cryopod-stub", &stub::build(abi).0, false).map_err(|source| {
                Error::Local {
                    call: "memfd_create(cryopod-stub)",
                    source,
                }
            })
        };
        Ok(Stubs {
            s64: make(Abi::X86_64)?,
            s32: make(Abi::Ia32)?,
        })
    }

    fn file(&self, abi: Abi) -> &File {
        match abi {
            Abi::X86_64 => &self.s64,
            Abi::Ia32 => &self.s32,
        }
    }
}

fn setoptions(pid: Pid) -> Result<()> {
    sys::ptrace_setoptions(pid, OPTIONS).map_err(|source| Error::Ptrace {
        request: "PTRACE_SETOPTIONS",
        pid,
        source,
    })
}

/// Starts the stub of `abi` as a child of cryopod (as pid `want` if given),
/// stopped at its first instruction. Returns its pid and code address.
pub fn spawn(
    family: &mut Family,
    stubs: &Stubs,
    want: Option<Pid>,
    abi: Abi,
) -> Result<(Pid, u64)> {
    let pid = want.unwrap_or(Pid(0));
    let got = sys::spawn_traced_exec(want, stubs.file(abi), c"cryopod-stub").map_err(|source| {
        match source.raw_os_error() {
            Some(libc::EEXIST) => Error::PidInUse(pid),
            _ => Error::Sys {
                call: "clone3(set_tid)",
                pid,
                source,
            },
        }
    })?;
    family.pids.push(got);
    if want.is_some_and(|w| w != got) {
        return Err(Error::Restore {
            pid,
            problem: format!("clone3 gave pid {got}"),
        });
    }
    let status = crate::error::wait(got)?;
    if !(libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == libc::SIGTRAP) {
        let why = if abi == Abi::Ia32 {
            " (is IA32 emulation enabled in this kernel?)"
        } else {
            ""
        };
        return Err(Error::Restore {
            pid: got,
            problem: format!(
                "the {} stub did not start (wait status {status:#x}){why}",
                abi.name()
            ),
        });
    }
    setoptions(got)?;
    debug!(pid = %got, abi = abi.name(), "stub running");
    Ok((got, stub::entry(abi)))
}

/// Forks `child` from the stopped process behind `parent` (its parent in
/// the dumped tree), with `scratch` a writable address in the parent.
/// Returns the child stopped right after its fork, before it runs anything.
pub fn fork(family: &mut Family, parent: &Injector, scratch: u64, child: Pid) -> Result<Injector> {
    fork_with(family, parent, scratch, child, 0)
}

/// `fork` with extra clone flags (CLONE_PARENT: the child becomes a sibling
/// of the process that forks it).
pub fn fork_with(
    family: &mut Family,
    parent: &Injector,
    scratch: u64,
    child: Pid,
    flags: u64,
) -> Result<Injector> {
    let ppid = parent.pid();
    let write = |pid: Pid, addr: u64, bytes: &[u8]| {
        sys::write_remote(pid, addr, bytes).map_err(|source| Error::Sys {
            call: "process_vm_writev(clone args)",
            pid,
            source,
        })
    };
    write(ppid, scratch + 128, &child.0.to_le_bytes())?;
    let mut args = Vec::with_capacity(CLONE_ARGS_LEN as usize);
    // With CLONE_PARENT the exit signal is the forker's own and must be 0.
    let exit_signal = if flags & libc::CLONE_PARENT as u64 != 0 {
        0
    } else {
        libc::SIGCHLD as u64
    };
    // flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size,
    // tls, set_tid, set_tid_size, cgroup
    for w in [flags, 0, 0, 0, exit_signal, 0, 0, 0, scratch + 128, 1, 0] {
        args.extend_from_slice(&w.to_le_bytes());
    }
    write(ppid, scratch, &args)?;
    let got = parent.call(
        "clone3",
        nr::x86_64::CLONE3,
        [scratch, CLONE_ARGS_LEN, 0, 0, 0, 0],
        || format!("child {child}"),
    )?;
    family.pids.push(Pid(got as i32));
    if got != child.0 as u64 {
        return Err(Error::Restore {
            pid: ppid,
            problem: format!("child {child} was forked as {got}"),
        });
    }
    let status = crate::error::wait(child)?;
    if !libc::WIFSTOPPED(status) {
        return Err(Error::UnexpectedStop {
            pid: child,
            doing: "forking",
            status,
        });
    }
    let regs = sys::ptrace_getregs(child).map_err(|source| Error::Ptrace {
        request: "PTRACE_GETREGS",
        pid: child,
        source,
    })?;
    Ok(parent.clone_for(child, regs))
}

/// Makes a freshly forked child exec the stub of `abi`; returns its code
/// address. `scratch` is writable in the child (inherited from the parent).
pub fn exec_stub(child: &Injector, stubs: &Stubs, scratch: u64, abi: Abi) -> Result<u64> {
    let pid = child.pid();
    sys::write_remote(pid, scratch, &[0]).map_err(|source| Error::Sys {
        call: "process_vm_writev(exec path)",
        pid,
        source,
    })?;
    let fd = stubs.file(abi).as_raw_fd() as u64;
    child.call(
        "execveat",
        nr::x86_64::EXECVEAT,
        [fd, scratch, 0, 0, libc::AT_EMPTY_PATH as u64, 0],
        || format!("the {} stub", abi.name()),
    )?;
    debug!(%pid, abi = abi.name(), "stub exec'd in forked child");
    Ok(stub::entry(abi))
}

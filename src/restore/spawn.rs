//! Creating the new task: `clone3` with the dumped pid, exec of the stub of
//! the task's width, and a guard that kills the task if restore fails.

use tracing::debug;

use crate::arch::Abi;
use crate::error::{Error, Result};
use crate::sys::{self, Pid};

use super::stub;

/// A traced child being built. Dropped while armed, it is killed and reaped:
/// a failed restore leaves no process behind.
pub struct Child {
    pid: Pid,
    armed: bool,
}

impl Child {
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The task is complete and released: stop guarding it.
    pub fn disarm(mut self) -> Pid {
        self.armed = false;
        self.pid
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.armed {
            let _ = sys::kill(self.pid, libc::SIGKILL);
            let _ = sys::waitpid(self.pid, 0);
            debug!(pid = %self.pid, "half-made task killed");
        }
    }
}

/// Starts the stub of `abi` (as pid `want` if given), stopped at its first
/// instruction. Returns the guard and the address of the stub's code.
pub fn spawn(want: Option<Pid>, abi: Abi) -> Result<(Child, u64)> {
    let pid = want.unwrap_or(Pid(0));
    let (elf, code) = stub::build(abi);
    let memfd = sys::memfd_with(c"cryopod-stub", &elf).map_err(|source| Error::Local {
        call: "memfd_create(cryopod-stub)",
        source,
    })?;
    let got =
        sys::spawn_traced_exec(want, &memfd, c"cryopod-stub").map_err(|source| {
            match source.raw_os_error() {
                Some(libc::EEXIST) => Error::PidInUse(pid),
                _ => Error::Sys {
                    call: "clone3(set_tid)",
                    pid,
                    source,
                },
            }
        })?;
    let child = Child {
        pid: got,
        armed: true,
    };
    let pid = got;
    if want.is_some_and(|w| w != got) {
        return Err(Error::Restore {
            pid,
            problem: format!("clone3 gave pid {got}"),
        });
    }
    let status = sys::waitpid(pid, 0).map_err(|source| Error::Sys {
        call: "waitpid",
        pid,
        source,
    })?;
    if !(libc::WIFSTOPPED(status) && libc::WSTOPSIG(status) == libc::SIGTRAP) {
        let why = if abi == Abi::Ia32 {
            " (is IA32 emulation enabled in this kernel?)"
        } else {
            ""
        };
        return Err(Error::Restore {
            pid,
            problem: format!(
                "the {} stub did not start (wait status {status:#x}){why}",
                abi.name()
            ),
        });
    }
    sys::ptrace_setoptions(
        pid,
        sys::PTRACE_O_TRACESYSGOOD | sys::PTRACE_O_EXITKILL | sys::PTRACE_O_TRACECLONE,
    )
    .map_err(|source| Error::Ptrace {
        request: "PTRACE_SETOPTIONS",
        pid,
        source,
    })?;
    debug!(%pid, abi = abi.name(), "stub running");
    Ok((child, code))
}

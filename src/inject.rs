//! Running syscalls inside a stopped tracee: point its instruction pointer at
//! a `syscall` (or `int 0x80`) instruction in its own memory, load the
//! arguments, and let it run from syscall entry to syscall exit under
//! `PTRACE_SYSCALL`. Used by dump (to read state only the task itself can
//! read, such as signal actions and the LDT) and by restore (to build the
//! task from inside).
//!
//! Injected syscalls always run with the CPU in 64-bit mode, so `syscall`
//! reaches the 64-bit table even in an ia32 task; `int 0x80` reaches the
//! 32-bit table from there, which is how an ia32 task gets its signal
//! handlers marked for 32-bit frames.

use crate::arch::{Regs, USER_DS, USER64_CS};
use crate::error::{Error, Result};
use crate::sys::{self, Pid};

/// Which kernel entry an injected syscall goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// `syscall` from 64-bit mode: x86_64 numbers and structures.
    Native,
    /// `int 0x80`: i386 numbers, 32-bit structures, 32-bit arguments.
    Compat,
}

const SIGTRAP_SYSCALL: i32 = libc::SIGTRAP | 0x80;

/// A stopped tracee that can run injected syscalls.
pub struct Injector {
    pid: Pid,
    /// Registers to start each injected syscall from.
    base: Regs,
    /// Address of a `syscall` instruction (bytes 0f 05) in the tracee.
    syscall_at: u64,
    /// Address of an `int 0x80` instruction (bytes cd 80), if known.
    int80_at: Option<u64>,
}

impl Injector {
    pub fn new(pid: Pid, base: Regs, syscall_at: u64, int80_at: Option<u64>) -> Injector {
        let mut base = base;
        base.cs = USER64_CS;
        base.ss = USER_DS;
        // Trap flag off, direction flag off: nothing but the syscall runs.
        base.eflags &= !(0x100 | 0x400);
        Injector {
            pid,
            base,
            syscall_at,
            int80_at,
        }
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// An injector for another task (a thread or a forked child) that runs
    /// the same code, starting from that task's registers `regs`.
    pub fn clone_for(&self, pid: Pid, regs: Regs) -> Injector {
        Injector::new(pid, regs, self.syscall_at, self.int80_at)
    }

    /// Re-reads the registers to start from (after an exec replaced them).
    pub fn rebase(&mut self) -> Result<()> {
        let pid = self.pid;
        let regs = sys::ptrace_getregs(pid).map_err(|source| Error::Ptrace {
            request: "PTRACE_GETREGS",
            pid,
            source,
        })?;
        *self = Injector::new(pid, regs, self.syscall_at, self.int80_at);
        Ok(())
    }

    pub fn set_code(&mut self, syscall_at: u64, int80_at: Option<u64>) {
        self.syscall_at = syscall_at;
        self.int80_at = int80_at;
    }

    /// Runs one syscall and returns its raw result (negative errno on failure).
    pub fn raw(&self, entry: Entry, nr: u64, args: [u64; 6]) -> Result<i64> {
        let mut regs = self.base;
        regs.rax = nr;
        regs.orig_rax = u64::MAX;
        match entry {
            Entry::Native => {
                regs.rip = self.syscall_at;
                regs.rdi = args[0];
                regs.rsi = args[1];
                regs.rdx = args[2];
                regs.r10 = args[3];
                regs.r8 = args[4];
                regs.r9 = args[5];
            }
            Entry::Compat => {
                regs.rip = self.int80_at.ok_or_else(|| Error::Restore {
                    pid: self.pid,
                    problem: "no int 0x80 instruction to inject a 32-bit syscall".into(),
                })?;
                regs.rbx = args[0];
                regs.rcx = args[1];
                regs.rdx = args[2];
                regs.rsi = args[3];
                regs.rdi = args[4];
                regs.rbp = args[5];
            }
        }
        let after = self.run(&regs)?;
        Ok(match entry {
            Entry::Native => after.rax as i64,
            Entry::Compat => after.rax as u32 as i32 as i64,
        })
    }

    /// Runs one syscall; a negative result becomes an error naming the call.
    pub fn call(
        &self,
        name: &'static str,
        nr: u64,
        args: [u64; 6],
        detail: impl FnOnce() -> String,
    ) -> Result<u64> {
        self.call_via(Entry::Native, name, nr, args, detail)
    }

    pub fn call_via(
        &self,
        entry: Entry,
        name: &'static str,
        nr: u64,
        args: [u64; 6],
        detail: impl FnOnce() -> String,
    ) -> Result<u64> {
        let ret = self.raw(entry, nr, args)?;
        if (-4095..0).contains(&ret) {
            return Err(Error::Remote {
                syscall: name,
                pid: self.pid,
                detail: detail(),
                source: std::io::Error::from_raw_os_error(-ret as i32),
            });
        }
        Ok(ret as u64)
    }

    /// Makes the tracee call `exit_group(code)` and waits until it is gone.
    pub fn exit(&self, code: u64) -> Result<()> {
        let pid = self.pid;
        let mut regs = self.base;
        regs.rip = self.syscall_at;
        regs.rax = crate::arch::nr::x86_64::EXIT_GROUP;
        regs.orig_rax = u64::MAX;
        regs.rdi = code;
        let ptrace_err = |request, source| Error::Ptrace {
            request,
            pid,
            source,
        };
        sys::ptrace_setregs(pid, &regs).map_err(|e| ptrace_err("PTRACE_SETREGS", e))?;
        sys::ptrace_syscall(pid, 0).map_err(|e| ptrace_err("PTRACE_SYSCALL", e))?;
        self.wait_syscall_stop()?;
        sys::ptrace_syscall(pid, 0).map_err(|e| ptrace_err("PTRACE_SYSCALL", e))?;
        loop {
            let status = crate::error::wait(pid)?;
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                return Ok(());
            }
            // The exit event or a late stop: let it go on dying.
            sys::ptrace_syscall(pid, 0).map_err(|e| ptrace_err("PTRACE_SYSCALL", e))?;
        }
    }

    /// Sets `regs`, runs the tracee from syscall entry to syscall exit, and
    /// returns the registers at the exit stop. The tracee stays stopped there.
    fn run(&self, regs: &Regs) -> Result<Regs> {
        let pid = self.pid;
        let ptrace_err = |request, source| Error::Ptrace {
            request,
            pid,
            source,
        };
        sys::ptrace_setregs(pid, regs).map_err(|e| ptrace_err("PTRACE_SETREGS", e))?;
        for _stop in ["entry", "exit"] {
            sys::ptrace_syscall(pid, 0).map_err(|e| ptrace_err("PTRACE_SYSCALL", e))?;
            self.wait_syscall_stop()?;
        }
        sys::ptrace_getregs(pid).map_err(|e| ptrace_err("PTRACE_GETREGS", e))
    }

    fn wait_syscall_stop(&self) -> Result<()> {
        let pid = self.pid;
        loop {
            let status = crate::error::wait(pid)?;
            if !libc::WIFSTOPPED(status) {
                return Err(Error::UnexpectedStop {
                    pid,
                    doing: "running an injected syscall",
                    status,
                });
            }
            if libc::WSTOPSIG(status) == SIGTRAP_SYSCALL {
                return Ok(());
            }
            if status >> 16 != 0 {
                // A group-stop, a late interrupt, or the clone event of an
                // injected clone3: go on to the syscall's stops.
                sys::ptrace_syscall(pid, 0).map_err(|source| Error::Ptrace {
                    request: "PTRACE_SYSCALL",
                    pid,
                    source,
                })?;
                continue;
            }
            return Err(Error::UnexpectedStop {
                pid,
                doing: "running an injected syscall",
                status,
            });
        }
    }
}

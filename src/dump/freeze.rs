//! Freezing a task with ptrace and, whatever happens, letting it go as it
//! was: `Frozen` detaches on drop, putting back the registers and signal
//! mask it was found with (with syscall restart applied, since the task will
//! not pass through the kernel's own restart path again).

use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::arch::{Regs, Resume};
use crate::error::{Error, Result};
use crate::sys::{self, Pid};

const PTRACE_EVENT_STOP: i32 = 128;

pub struct Frozen {
    pid: Pid,
    since: Instant,
    /// Registers and mask to write back before the task runs again, once
    /// injected code has touched them.
    resume: Option<(Regs, u64)>,
    done: bool,
}

impl Frozen {
    /// Seizes and interrupts `pid`, waiting until it is in a ptrace-stop.
    pub fn new(pid: Pid) -> Result<Frozen> {
        sys::ptrace_seize(pid, sys::PTRACE_O_TRACESYSGOOD).map_err(|source| {
            let tracer = crate::proc::process(pid)
                .ok()
                .and_then(|p| p.status().ok())
                .map(|s| s.tracerpid)
                .unwrap_or(0);
            if tracer != 0 {
                Error::Dump {
                    pid,
                    problem: format!("cannot freeze it: it is already traced by pid {tracer}"),
                }
            } else {
                Error::Ptrace {
                    request: "PTRACE_SEIZE",
                    pid,
                    source,
                }
            }
        })?;
        let frozen = Frozen {
            pid,
            since: Instant::now(),
            resume: None,
            done: false,
        };
        sys::ptrace_interrupt(pid).map_err(|source| Error::Ptrace {
            request: "PTRACE_INTERRUPT",
            pid,
            source,
        })?;
        loop {
            let status = crate::error::wait(pid)?;
            if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
                // It exited between the seize and the stop: nothing to
                // detach from, nothing to dump.
                let mut gone = frozen;
                gone.done = true;
                return Err(Error::NoSuchProcess(pid));
            }
            if !libc::WIFSTOPPED(status) {
                return Err(Error::UnexpectedStop {
                    pid,
                    doing: "freezing",
                    status,
                });
            }
            if status >> 16 == PTRACE_EVENT_STOP {
                break;
            }
            // A signal arrived before our interrupt: hand it back and wait on.
            let sig = libc::WSTOPSIG(status);
            debug!(%pid, sig, "signal-delivery-stop while freezing; passing it on");
            sys::ptrace_syscall(pid, 0)
                .and_then(|_| sys::kill(pid, sig))
                .and_then(|_| sys::ptrace_interrupt(pid))
                .map_err(|source| Error::Ptrace {
                    request: "PTRACE_INTERRUPT",
                    pid,
                    source,
                })?;
        }
        debug!(%pid, "frozen");
        Ok(frozen)
    }

    /// Remembers what to write back before the task runs again.
    pub fn set_resume_state(&mut self, regs: Regs, mask: u64) {
        self.resume = Some((regs.with_restart_applied(Resume::Live), mask));
    }

    /// Lets the task run on, as it was.
    pub fn release(mut self) -> Result<Duration> {
        self.done = true;
        self.put_back()?;
        sys::ptrace_detach(self.pid, 0).map_err(|source| Error::Ptrace {
            request: "PTRACE_DETACH",
            pid: self.pid,
            source,
        })?;
        Ok(self.since.elapsed())
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Replaces the mask to put back (once the real one is known).
    pub fn set_resume_mask(&mut self, mask: u64) {
        if let Some((_, m)) = &mut self.resume {
            *m = mask;
        }
    }

    pub fn since(&self) -> Instant {
        self.since
    }

    /// Waits until this (killed) thread is gone; no detach is owed after.
    fn wait_gone(mut self) {
        self.done = true;
        // As its tracer we hear of its death; its parent reaps it.
        while let Ok(st) = sys::waitpid(self.pid, 0) {
            if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
                break;
            }
        }
    }

    fn put_back(&mut self) -> Result<()> {
        if let Some((regs, mask)) = self.resume.take() {
            let pid = self.pid;
            sys::ptrace_setregs(pid, &regs).map_err(|source| Error::Ptrace {
                request: "PTRACE_SETREGS",
                pid,
                source,
            })?;
            sys::ptrace_set_sigmask(pid, mask).map_err(|source| Error::Ptrace {
                request: "PTRACE_SETSIGMASK",
                pid,
                source,
            })?;
        }
        Ok(())
    }
}

/// Freezes every thread of process `pid`, main thread first. Threads that
/// appear while others are being frozen (made by a thread not yet frozen)
/// are caught by listing again until the list stops changing.
pub fn freeze_process(pid: Pid) -> Result<Vec<Frozen>> {
    let mut frozen: Vec<Frozen> = vec![Frozen::new(pid)?];
    loop {
        let mut added = false;
        for tid in crate::proc::threads(pid)? {
            if frozen.iter().any(|f| f.pid == tid) {
                continue;
            }
            if let Some(f) = freeze_thread(pid, tid)? {
                frozen.push(f);
                added = true;
            }
        }
        if !added {
            return Ok(frozen);
        }
    }
}

/// Freezes one non-main thread; `None` when it exited meanwhile. A thread
/// on its way out refuses PTRACE_SEIZE (EPERM) until it is gone, so a
/// refusal is retried for a short while before it counts.
fn freeze_thread(pid: Pid, tid: Pid) -> Result<Option<Frozen>> {
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").and_then(|(_, r)| r.chars().next()))
            .is_some_and(|state| state != 'Z' && state != 'X')
    };
    for _ in 0..100 {
        match Frozen::new(tid) {
            Ok(f) => return Ok(Some(f)),
            // Exited between the listing and the seize, or before it stopped.
            Err(Error::Ptrace { source, .. }) if source.raw_os_error() == Some(libc::ESRCH) => {
                return Ok(None);
            }
            Err(Error::NoSuchProcess(_)) => return Ok(None),
            Err(Error::Ptrace { .. }) => {
                if !alive() {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(1));
                if !alive() {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Frozen::new(tid).map(Some)
}

/// Lets every thread run on as it was.
pub fn release_process(threads: Vec<Frozen>) -> Result<()> {
    for f in threads.into_iter().rev() {
        f.release()?;
    }
    Ok(())
}

/// After the process was sent SIGKILL: waits until every thread is gone.
/// The leader's death is reported only after every other thread of the
/// group has been waited for: leader last.
pub fn wait_gone(threads: Vec<Frozen>) {
    for f in threads.into_iter().rev() {
        f.wait_gone();
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Err(e) = self.put_back() {
            warn!(pid = %self.pid, "could not restore registers before letting go: {e}");
        }
        if let Err(e) = sys::ptrace_detach(self.pid, 0) {
            warn!(pid = %self.pid, "PTRACE_DETACH failed: {e}");
        } else {
            debug!(pid = %self.pid, "released after failure");
        }
    }
}

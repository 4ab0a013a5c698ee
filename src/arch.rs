//! What differs between the two task widths: the ABI a task was born with,
//! its register file as a 64-bit tracer sees it, and the syscall numbers of
//! both entry points.
//!
//! A task's ABI (the ELF class of the binary that made its memory) and the CPU
//! mode it is in at a given moment (its CS selector) are independent facts;
//! this module keeps them apart.

use serde::{Deserialize, Serialize};

/// The ABI a task was exec'd with. Decided from the ELF class of its exe,
/// never from its current CPU mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Abi {
    /// Native x86_64.
    X86_64,
    /// 32-bit compat (ia32).
    Ia32,
}

impl Abi {
    /// Reads the ABI from the ELF identification bytes of a binary.
    pub fn from_elf_ident(ident: &[u8]) -> Option<Abi> {
        if ident.len() < 5 || &ident[..4] != b"\x7fELF" {
            return None;
        }
        match ident[4] {
            1 => Some(Abi::Ia32),
            2 => Some(Abi::X86_64),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Abi::X86_64 => "x86_64",
            Abi::Ia32 => "ia32",
        }
    }
}

/// User code selector for 64-bit mode.
pub const USER64_CS: u64 = 0x33;
/// User code selector for 32-bit compat mode.
pub const USER32_CS: u64 = 0x23;
/// User data selector (both modes).
pub const USER_DS: u64 = 0x2b;

/// The general purpose registers in the layout of `struct user_regs_struct`
/// for a 64-bit tracer: all 64-bit registers, whatever mode the tracee is in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub orig_rax: u64,
    pub rip: u64,
    pub cs: u64,
    pub eflags: u64,
    pub rsp: u64,
    pub ss: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub ds: u64,
    pub es: u64,
    pub fs: u64,
    pub gs: u64,
}

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// Where a task whose syscall was interrupted is going to continue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The same kernel task goes on: its restart block is still valid, so a
    /// restart-block syscall is continued through `restart_syscall`.
    Live,
    /// A new task made by restore: the restart block (kernel state) is lost,
    /// so a restart-block syscall returns `-EINTR`, as after a signal.
    Fresh,
}

impl Regs {
    /// True when the task is executing 32-bit code right now.
    pub fn in_compat_mode(&self) -> bool {
        self.cs == USER32_CS
    }

    /// The syscall return value as the task's current mode sees it.
    fn syscall_error(&self) -> i64 {
        if self.in_compat_mode() {
            self.rax as u32 as i32 as i64
        } else {
            self.rax as i64
        }
    }

    /// True when the task sits in a syscall that swaps in a temporary signal
    /// mask while it waits (sigsuspend, ppoll, pselect6, epoll_pwait): its
    /// current mask is that temporary one, and the kernel puts the real one
    /// back only on its way out to user mode.
    pub fn in_temporary_mask_syscall(&self) -> bool {
        const NATIVE: [u64; 6] = [130, 271, 270, 281, 441, 333];
        const COMPAT: [u64; 8] = [72, 179, 309, 414, 308, 413, 319, 441];
        if self.in_compat_mode() {
            COMPAT.contains(&(self.orig_rax & 0xffff_ffff))
        } else {
            NATIVE.contains(&self.orig_rax)
        }
    }

    /// Applies the kernel's syscall restart rules to registers read from a
    /// task stopped inside a syscall, so that writing them back and letting
    /// the task go makes it redo (or fail) the syscall as the kernel would
    /// have done. Both `syscall` and `int 0x80` are two bytes long.
    pub fn with_restart_applied(mut self, resume: Resume) -> Regs {
        let nr = if self.in_compat_mode() {
            self.orig_rax as u32 as i32 as i64
        } else {
            self.orig_rax as i64
        };
        if nr < 0 {
            return self;
        }
        match -self.syscall_error() {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                self.rax = self.orig_rax;
                self.rip = self.rip.wrapping_sub(2);
            }
            ERESTART_RESTARTBLOCK => match resume {
                Resume::Live => {
                    // The restart_syscall number of the mode the syscall was
                    // made from. A 64-bit task calling `int 0x80` is taken for
                    // a 64-bit call here: its CS does not tell the two apart.
                    self.rax = if self.in_compat_mode() {
                        nr::i386::RESTART_SYSCALL
                    } else {
                        nr::x86_64::RESTART_SYSCALL
                    };
                    self.rip = self.rip.wrapping_sub(2);
                }
                Resume::Fresh => self.rax = (-(libc::EINTR as i64)) as u64,
            },
            _ => {}
        }
        // Nothing is left for the kernel's own restart logic to do.
        self.orig_rax = u64::MAX;
        self
    }
}

/// Syscall numbers used by injected code, for both entry points.
pub mod nr {
    pub mod x86_64 {
        pub const RESTART_SYSCALL: u64 = 219;
        pub const MMAP: u64 = 9;
        pub const MPROTECT: u64 = 10;
        pub const MUNMAP: u64 = 11;
        pub const BRK: u64 = 12;
        pub const RT_SIGACTION: u64 = 13;
        pub const GETPID: u64 = 39;
        pub const SIGALTSTACK: u64 = 131;
        pub const MADVISE: u64 = 28;
        pub const SET_TID_ADDRESS: u64 = 218;
        pub const SET_ROBUST_LIST: u64 = 273;
        pub const GET_ROBUST_LIST: u64 = 274;
        pub const RSEQ: u64 = 334;
        pub const CLONE3: u64 = 435;
        pub const EXECVEAT: u64 = 322;
        pub const SETSID: u64 = 112;
        pub const SETPGID: u64 = 109;
        pub const EXIT_GROUP: u64 = 231;
        pub const RECVMSG: u64 = 47;
        pub const FCNTL: u64 = 72;
        pub const WAIT4: u64 = 61;
        pub const RT_SIGTIMEDWAIT: u64 = 128;
        pub const LSEEK: u64 = 8;
        pub const CLOSE: u64 = 3;
        pub const DUP3: u64 = 292;
        pub const OPENAT: u64 = 257;
        pub const CHDIR: u64 = 80;
        pub const FCHDIR: u64 = 81;
        pub const CHROOT: u64 = 161;
        pub const UMASK: u64 = 95;
        pub const PERSONALITY: u64 = 135;
        pub const PRCTL: u64 = 157;
        pub const ARCH_PRCTL: u64 = 158;
        pub const MODIFY_LDT: u64 = 154;
        pub const PRLIMIT64: u64 = 302;
        pub const RT_SIGQUEUEINFO: u64 = 129;
        pub const RT_TGSIGQUEUEINFO: u64 = 297;
    }
    pub mod i386 {
        pub const RESTART_SYSCALL: u64 = 0;
        pub const RT_SIGACTION: u64 = 174;
        pub const OPENAT: u64 = 295;
        pub const SET_ROBUST_LIST: u64 = 311;
        pub const GET_ROBUST_LIST: u64 = 312;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_syscall(cs: u64, nr: u64, ret: i64) -> Regs {
        Regs {
            cs,
            orig_rax: nr,
            rax: ret as u64,
            rip: 0x1000,
            ..Regs::default()
        }
    }

    #[test]
    fn restartsys_rewinds_to_the_syscall() {
        let r = in_syscall(USER64_CS, 0, -512).with_restart_applied(Resume::Fresh);
        assert_eq!((r.rax, r.rip, r.orig_rax), (0, 0xffe, u64::MAX));
    }

    #[test]
    fn restart_block_is_eintr_in_a_fresh_task_and_restarts_in_a_live_one() {
        let fresh = in_syscall(USER64_CS, 35, -516).with_restart_applied(Resume::Fresh);
        assert_eq!((fresh.rax as i64, fresh.rip), (-4, 0x1000));
        let live = in_syscall(USER64_CS, 35, -516).with_restart_applied(Resume::Live);
        assert_eq!((live.rax, live.rip), (219, 0xffe));
        let live32 = in_syscall(USER32_CS, 162, -516).with_restart_applied(Resume::Live);
        assert_eq!((live32.rax, live32.rip), (0, 0xffe));
    }

    #[test]
    fn compat_error_is_read_from_the_low_half() {
        // A compat syscall's return value zero-extended in rax.
        let r = in_syscall(USER32_CS, 3, 0xffff_fe00).with_restart_applied(Resume::Fresh);
        assert_eq!((r.rax, r.rip), (3, 0xffe));
    }

    #[test]
    fn user_space_is_left_alone() {
        let r = Regs {
            orig_rax: u64::MAX,
            rax: (-512i64) as u64,
            rip: 0x1000,
            ..Regs::default()
        };
        assert_eq!(r.with_restart_applied(Resume::Fresh), r);
    }

    #[test]
    fn temporary_mask_syscalls_are_told_by_mode() {
        assert!(in_syscall(USER64_CS, 130, -514).in_temporary_mask_syscall());
        assert!(in_syscall(USER32_CS, 179, -514).in_temporary_mask_syscall());
        // 179 is not rt_sigsuspend in the 64-bit table (it is quotactl).
        assert!(!in_syscall(USER64_CS, 179, -514).in_temporary_mask_syscall());
        assert!(!in_syscall(USER64_CS, 35, -516).in_temporary_mask_syscall());
    }

    #[test]
    fn elf_class_decides_the_abi() {
        assert_eq!(Abi::from_elf_ident(b"\x7fELF\x01"), Some(Abi::Ia32));
        assert_eq!(Abi::from_elf_ident(b"\x7fELF\x02"), Some(Abi::X86_64));
        assert_eq!(Abi::from_elf_ident(b"#!/bin"), None);
    }
}

//! The kernel-facing layer: every raw syscall cryopod makes on its own behalf
//! (ptrace, waitpid, process_vm_*, clone3, memfd, mmap of image files) lives
//! here, and so does all of the crate's `unsafe`. Each wrapper names the
//! syscall it makes and returns `io::Error` with the errno; callers add the
//! context (pid, address, path).

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

use crate::arch::Regs;

/// A process or thread id in cryopod's pid namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Pid(pub i32);

impl fmt::Display for Pid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

fn check(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub const PTRACE_O_TRACESYSGOOD: u64 = 1;
pub const PTRACE_O_EXITKILL: u64 = 0x10_0000;
const PTRACE_SEIZE: u32 = 0x4206;
const PTRACE_INTERRUPT: u32 = 0x4207;
const PTRACE_GETREGSET: u32 = 0x4204;
const PTRACE_SETREGSET: u32 = 0x4205;
const PTRACE_PEEKSIGINFO: u32 = 0x4209;
const PTRACE_GETSIGMASK: u32 = 0x420a;
const PTRACE_SETSIGMASK: u32 = 0x420b;
const PTRACE_GET_THREAD_AREA: u32 = 25;
const PTRACE_GET_RSEQ_CONFIGURATION: u32 = 0x420f;
pub const PTRACE_O_TRACECLONE: u64 = 8;
pub const PTRACE_O_TRACEFORK: u64 = 2;
pub const PTRACE_O_TRACEEXEC: u64 = 0x10;
const PTRACE_SET_THREAD_AREA: u32 = 26;
const NT_X86_XSTATE: usize = 0x202;
/// Largest xstate buffer we offer the kernel; it trims to the CPU's size.
const XSTATE_MAX: usize = 16 * 1024;

/// # Safety
/// `addr` and `data` must be valid for the request as the kernel reads them.
unsafe fn ptrace_raw(req: u32, pid: Pid, addr: usize, data: usize) -> io::Result<libc::c_long> {
    // SAFETY: the caller guarantees addr/data fit the request.
    check(unsafe { libc::ptrace(req as _, pid.0, addr, data) })
}

/// `ptrace(PTRACE_SEIZE)`: attach without stopping.
pub fn ptrace_seize(pid: Pid, options: u64) -> io::Result<()> {
    // SAFETY: SEIZE takes no pointers; data is the option bits.
    unsafe { ptrace_raw(PTRACE_SEIZE, pid, 0, options as usize) }.map(drop)
}

/// `ptrace(PTRACE_INTERRUPT)`: stop a seized tracee.
pub fn ptrace_interrupt(pid: Pid) -> io::Result<()> {
    // SAFETY: no pointers.
    unsafe { ptrace_raw(PTRACE_INTERRUPT, pid, 0, 0) }.map(drop)
}

/// `ptrace(PTRACE_SETOPTIONS)`.
pub fn ptrace_setoptions(pid: Pid, options: u64) -> io::Result<()> {
    // SAFETY: no pointers; data is the option bits.
    unsafe { ptrace_raw(libc::PTRACE_SETOPTIONS, pid, 0, options as usize) }.map(drop)
}

/// `ptrace(PTRACE_SYSCALL)`: resume until the next syscall entry or exit.
pub fn ptrace_syscall(pid: Pid, sig: i32) -> io::Result<()> {
    // SAFETY: no pointers; data is a signal number.
    unsafe { ptrace_raw(libc::PTRACE_SYSCALL, pid, 0, sig as usize) }.map(drop)
}

/// `ptrace(PTRACE_DETACH)`.
pub fn ptrace_detach(pid: Pid, sig: i32) -> io::Result<()> {
    // SAFETY: no pointers; data is a signal number.
    unsafe { ptrace_raw(libc::PTRACE_DETACH, pid, 0, sig as usize) }.map(drop)
}

/// `ptrace(PTRACE_GETREGS)`: the 64-bit register file, whatever the mode.
pub fn ptrace_getregs(pid: Pid) -> io::Result<Regs> {
    let mut regs = Regs::default();
    // SAFETY: Regs has the layout of user_regs_struct and lives for the call.
    unsafe {
        ptrace_raw(
            libc::PTRACE_GETREGS,
            pid,
            0,
            &mut regs as *mut Regs as usize,
        )
    }?;
    Ok(regs)
}

/// `ptrace(PTRACE_SETREGS)`.
pub fn ptrace_setregs(pid: Pid, regs: &Regs) -> io::Result<()> {
    // SAFETY: Regs has the layout of user_regs_struct; the kernel only reads it.
    unsafe { ptrace_raw(libc::PTRACE_SETREGS, pid, 0, regs as *const Regs as usize) }.map(drop)
}

/// `ptrace(PTRACE_GETREGSET, NT_X86_XSTATE)`: FPU, SSE, AVX and the rest, in
/// the XSAVE layout of this CPU.
pub fn ptrace_get_xstate(pid: Pid) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: iov describes `buf`, which outlives the call; the kernel updates iov_len.
    unsafe {
        ptrace_raw(
            PTRACE_GETREGSET,
            pid,
            NT_X86_XSTATE,
            &mut iov as *mut _ as usize,
        )
    }?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// `ptrace(PTRACE_SETREGSET, NT_X86_XSTATE)`.
pub fn ptrace_set_xstate(pid: Pid, xstate: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: xstate.as_ptr() as *mut _,
        iov_len: xstate.len(),
    };
    // SAFETY: iov describes `xstate`, which the kernel only reads.
    unsafe {
        ptrace_raw(
            PTRACE_SETREGSET,
            pid,
            NT_X86_XSTATE,
            &mut iov as *mut _ as usize,
        )
    }
    .map(drop)
}

/// `ptrace(PTRACE_GET_RSEQ_CONFIGURATION)`: the thread's rseq area, its
/// length and signature, or `None` when it registered none.
pub fn ptrace_get_rseq(pid: Pid) -> io::Result<Option<(u64, u32, u32)>> {
    #[repr(C)]
    #[derive(Default)]
    struct RseqConf {
        addr: u64,
        len: u32,
        sig: u32,
        flags: u32,
        pad: u32,
    }
    let mut conf = RseqConf::default();
    // SAFETY: addr is the struct size, data points at a writable struct of it.
    unsafe {
        ptrace_raw(
            PTRACE_GET_RSEQ_CONFIGURATION,
            pid,
            std::mem::size_of::<RseqConf>(),
            &mut conf as *mut _ as usize,
        )
    }?;
    Ok((conf.addr != 0).then_some((conf.addr, conf.len, conf.sig)))
}

/// `struct user_desc`, the argument of set_thread_area and modify_ldt.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDesc {
    pub entry_number: u32,
    pub base_addr: u32,
    pub limit: u32,
    /// seg_32bit:1 contents:2 read_exec_only:1 limit_in_pages:1
    /// seg_not_present:1 useable:1 lm:1
    pub flags: u32,
}

impl UserDesc {
    pub fn as_bytes(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[0..4].copy_from_slice(&self.entry_number.to_le_bytes());
        out[4..8].copy_from_slice(&self.base_addr.to_le_bytes());
        out[8..12].copy_from_slice(&self.limit.to_le_bytes());
        out[12..16].copy_from_slice(&self.flags.to_le_bytes());
        out
    }
}

/// `ptrace(PTRACE_GET_THREAD_AREA)` for one GDT TLS slot.
pub fn ptrace_get_thread_area(pid: Pid, entry: u32) -> io::Result<UserDesc> {
    let mut desc = UserDesc::default();
    // SAFETY: UserDesc has the layout of struct user_desc and outlives the call.
    unsafe {
        ptrace_raw(
            PTRACE_GET_THREAD_AREA,
            pid,
            entry as usize,
            &mut desc as *mut _ as usize,
        )
    }?;
    Ok(desc)
}

/// `ptrace(PTRACE_SET_THREAD_AREA)` for one GDT TLS slot.
pub fn ptrace_set_thread_area(pid: Pid, desc: &UserDesc) -> io::Result<()> {
    // SAFETY: UserDesc has the layout of struct user_desc; read only.
    unsafe {
        ptrace_raw(
            PTRACE_SET_THREAD_AREA,
            pid,
            desc.entry_number as usize,
            desc as *const _ as usize,
        )
    }
    .map(drop)
}

/// `ptrace(PTRACE_GETSIGMASK)`.
pub fn ptrace_get_sigmask(pid: Pid) -> io::Result<u64> {
    let mut mask = 0u64;
    // SAFETY: addr is the mask size, data points at 8 writable bytes.
    unsafe { ptrace_raw(PTRACE_GETSIGMASK, pid, 8, &mut mask as *mut u64 as usize) }?;
    Ok(mask)
}

/// `ptrace(PTRACE_SETSIGMASK)`.
pub fn ptrace_set_sigmask(pid: Pid, mask: u64) -> io::Result<()> {
    // SAFETY: addr is the mask size, data points at 8 readable bytes.
    unsafe { ptrace_raw(PTRACE_SETSIGMASK, pid, 8, &mask as *const u64 as usize) }.map(drop)
}

/// Size of a `siginfo_t` as the 64-bit kernel hands it out.
pub const SIGINFO_SIZE: usize = 128;

/// `ptrace(PTRACE_PEEKSIGINFO)`: every queued signal, oldest first, from the
/// thread's own queue or (with `shared`) the process-wide one.
pub fn ptrace_peek_siginfo(pid: Pid, shared: bool) -> io::Result<Vec<[u8; SIGINFO_SIZE]>> {
    #[repr(C)]
    struct PeekArgs {
        off: u64,
        flags: u32,
        nr: i32,
    }
    const BATCH: usize = 32;
    let mut out = Vec::new();
    loop {
        let mut buf = [[0u8; SIGINFO_SIZE]; BATCH];
        let args = PeekArgs {
            off: out.len() as u64,
            flags: shared as u32,
            nr: BATCH as i32,
        };
        // SAFETY: args is a valid ptrace_peeksiginfo_args and buf holds nr entries.
        let n = unsafe {
            ptrace_raw(
                PTRACE_PEEKSIGINFO,
                pid,
                &args as *const _ as usize,
                buf.as_mut_ptr() as usize,
            )
        }? as usize;
        out.extend_from_slice(&buf[..n]);
        if n < BATCH {
            return Ok(out);
        }
    }
}

/// `waitpid(pid, __WALL)`; returns the raw status.
pub fn waitpid(pid: Pid, flags: i32) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: status is a valid out pointer.
        let r = unsafe { libc::waitpid(pid.0, &mut status, flags | libc::__WALL) };
        if r >= 0 {
            return Ok(status);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// `kill(pid, sig)`.
pub fn kill(pid: Pid, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    check(unsafe { libc::kill(pid.0, sig) } as libc::c_long).map(drop)
}

/// Is `pid` in use (alive or a zombie)?
pub fn pid_exists(pid: Pid) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid.0, 0) == 0 || *libc::__errno_location() != libc::ESRCH }
}

/// One contiguous piece of remote memory and the local buffer it pairs with.
pub struct Transfer {
    pub remote: u64,
    pub local: *mut u8,
    pub len: usize,
}

const IOV_BATCH: usize = 1024;

/// `process_vm_readv` / `process_vm_writev` over many pieces, in batches of
/// IOV_MAX. Returns how many bytes moved; stops early on a short transfer.
///
/// # Safety
/// Every `local` pointer must be valid for `len` bytes (writable for reads).
pub unsafe fn process_vm(pid: Pid, pieces: &[Transfer], write: bool) -> io::Result<usize> {
    let mut total = 0usize;
    for batch in pieces.chunks(IOV_BATCH) {
        let local: Vec<libc::iovec> = batch
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.local.cast(),
                iov_len: p.len,
            })
            .collect();
        let remote: Vec<libc::iovec> = batch
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.remote as usize as *mut _,
                iov_len: p.len,
            })
            .collect();
        let want: usize = batch.iter().map(|p| p.len).sum();
        // SAFETY: both iovec arrays describe `batch`; the caller vouches for the locals.
        let n = unsafe {
            if write {
                libc::process_vm_writev(
                    pid.0,
                    local.as_ptr(),
                    local.len() as _,
                    remote.as_ptr(),
                    remote.len() as _,
                    0,
                )
            } else {
                libc::process_vm_readv(
                    pid.0,
                    local.as_ptr(),
                    local.len() as _,
                    remote.as_ptr(),
                    remote.len() as _,
                    0,
                )
            }
        };
        let n = check(n as libc::c_long)? as usize;
        total += n;
        if n < want {
            break;
        }
    }
    Ok(total)
}

/// Reads remote memory into a fresh buffer.
pub fn read_remote(pid: Pid, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let piece = Transfer {
        remote: addr,
        local: buf.as_mut_ptr(),
        len,
    };
    // SAFETY: piece.local is buf, valid and writable for len bytes.
    let n = unsafe { process_vm(pid, &[piece], false) }?;
    buf.truncate(n);
    Ok(buf)
}

/// Writes a buffer into remote memory; all of it or an error.
pub fn write_remote(pid: Pid, addr: u64, data: &[u8]) -> io::Result<()> {
    let piece = Transfer {
        remote: addr,
        local: data.as_ptr() as *mut u8,
        len: data.len(),
    };
    // SAFETY: process_vm_writev only reads from piece.local, which is `data`.
    let n = unsafe { process_vm(pid, &[piece], true) }?;
    if n != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short process_vm_writev",
        ));
    }
    Ok(())
}

/// `memfd_create(name)` filled with `contents`; inherited over exec unless
/// `cloexec`.
pub fn memfd_with(name: &CStr, contents: &[u8], cloexec: bool) -> io::Result<File> {
    use std::io::Write;
    let flags = if cloexec { libc::MFD_CLOEXEC } else { 0 };
    // SAFETY: name is a valid C string.
    let fd = check(unsafe { libc::memfd_create(name.as_ptr(), flags) } as libc::c_long)?;
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let mut file = unsafe { File::from_raw_fd(fd as RawFd) };
    file.write_all(contents)?;
    Ok(file)
}

/// Creates a child, with pid `pid` if given (`clone3` with `set_tid`), that
/// asks to be traced and execs the program in `exe` (an fd, via
/// `execveat(AT_EMPTY_PATH)`). The child stops with SIGTRAP right after the
/// exec; if the exec fails it exits with status 127.
pub fn spawn_traced_exec(pid: Option<Pid>, exe: &File, argv0: &CStr) -> io::Result<Pid> {
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    let tid: libc::pid_t = pid.map_or(0, |p| p.0);
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: if pid.is_some() {
            &tid as *const _ as u64
        } else {
            0
        },
        set_tid_size: pid.is_some() as u64,
        ..CloneArgs::default()
    };
    let argv = [argv0.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let empty = c"";
    let fd = exe.as_raw_fd();
    // SAFETY: clone3 without CLONE_VM forks this process. The child runs only
    // raw syscalls (no allocation, no locks) on data prepared above, then
    // execs or exits.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if ret == 0 {
        // SAFETY: child side; see above.
        unsafe {
            libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0);
            libc::syscall(
                libc::SYS_execveat,
                fd,
                empty.as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
            libc::syscall(libc::SYS_exit_group, 127);
        }
    }
    check(ret)?;
    Ok(Pid(ret as i32))
}

/// A read-only (or read-write shared) mapping of a local file.
pub struct FileMap {
    ptr: *mut u8,
    len: usize,
}

impl FileMap {
    /// `mmap` of `len` bytes of `file` at offset 0.
    pub fn new(file: &File, len: usize, writable: bool) -> io::Result<FileMap> {
        if len == 0 {
            return Ok(FileMap {
                ptr: std::ptr::NonNull::dangling().as_ptr(),
                len: 0,
            });
        }
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping of a file we own; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(FileMap { ptr: p.cast(), len })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// `len` bytes at `offset`, or `None` past the end of the mapping.
    pub fn slice(&self, offset: usize, len: usize) -> Option<&[u8]> {
        if offset.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: offset + len lies inside the live mapping, which is only
        // read through this shared borrow while it exists.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.add(offset), len) })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: ptr/len are exactly what mmap returned.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }
}

/// `prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE)`: whether the kernel takes
/// PR_SET_MM_MAP (CONFIG_CHECKPOINT_RESTORE), and the struct size it wants.
pub fn prctl_mm_map_size() -> io::Result<u32> {
    let mut size: u32 = 0;
    // SAFETY: the kernel writes one u32 into `size`.
    check(unsafe {
        libc::prctl(
            libc::PR_SET_MM,
            libc::PR_SET_MM_MAP_SIZE,
            &mut size as *mut u32,
            0,
            0,
        )
    } as libc::c_long)?;
    Ok(size)
}

/// Duplicates an fd so that it survives in an `OwnedFd`.
pub fn dup(fd: &impl AsRawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a valid fd.
    let n =
        check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) } as libc::c_long)?;
    // SAFETY: n is a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(n as RawFd) })
}

/// `kcmp(pid, pid, KCMP_FILE, a, b)`: do fds `a` and `b` of `pid` share one
/// open file description?
pub fn same_open_file(pid: Pid, a: i32, b: i32) -> io::Result<bool> {
    same_open_file_across(pid, a, pid, b)
}

/// `kcmp(pa, pb, KCMP_FILE, a, b)`: is fd `a` of `pa` the same open file
/// description as fd `b` of `pb`?
pub fn same_open_file_across(pa: Pid, a: i32, pb: Pid, b: i32) -> io::Result<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp takes only integers.
    let r = check(unsafe { libc::syscall(libc::SYS_kcmp, pa.0, pb.0, KCMP_FILE, a, b) })?;
    Ok(r == 0)
}

/// `uname().release`.
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid out pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::from("unknown");
    }
    // SAFETY: release is NUL-terminated by the kernel.
    unsafe { CStr::from_ptr(u.release.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Is stderr a terminal (for progress bars)?
pub fn stderr_is_tty() -> bool {
    // SAFETY: isatty on a constant fd.
    unsafe { libc::isatty(2) == 1 }
}

/// `pipe2(O_CLOEXEC)`: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut p = [0i32; 2];
    // SAFETY: p has room for the two fds pipe2 writes.
    check(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) } as libc::c_long)?;
    // SAFETY: both fds were just made and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) })
}

/// `fcntl(F_GETPIPE_SZ)`.
pub fn pipe_capacity(fd: &impl AsRawFd) -> io::Result<u32> {
    // SAFETY: fcntl on a valid fd with an integer command.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) } as libc::c_long)
        .map(|n| n as u32)
}

/// `fcntl(F_SETPIPE_SZ)`.
pub fn set_pipe_capacity(fd: &impl AsRawFd, size: u32) -> io::Result<()> {
    // SAFETY: fcntl on a valid fd with integer arguments.
    check(
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) }
            as libc::c_long,
    )
    .map(drop)
}

/// `ioctl(FIONREAD)`: bytes waiting to be read.
pub fn bytes_buffered(fd: &impl AsRawFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into n.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) } as libc::c_long)?;
    Ok(n as usize)
}

/// `tee(input, output, len, SPLICE_F_NONBLOCK)`: copies pipe contents
/// without consuming them.
pub fn tee(input: &impl AsRawFd, output: &impl AsRawFd, len: usize) -> io::Result<usize> {
    // SAFETY: tee takes fds and integers only.
    check(unsafe {
        libc::tee(
            input.as_raw_fd(),
            output.as_raw_fd(),
            len,
            libc::SPLICE_F_NONBLOCK,
        )
    } as libc::c_long)
    .map(|n| n as usize)
}

/// A datagram socket pair for handing fds to restored tasks: the sending
/// end stays in cryopod (close-on-exec); the receiving end is moved to a
/// high fd number that is inherited over exec, so every stub has it.
pub fn courier() -> io::Result<(OwnedFd, i32)> {
    let mut sv = [0i32; 2];
    // SAFETY: sv has room for the two fds socketpair writes.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
            sv.as_mut_ptr(),
        )
    } as libc::c_long)?;
    // SAFETY: both fds were just made and are owned by nobody else.
    let (send, recv) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
    // SAFETY: F_DUPFD on a valid fd; the copy is not close-on-exec.
    let high =
        check(unsafe { libc::fcntl(recv.as_raw_fd(), libc::F_DUPFD, 1000) } as libc::c_long)?;
    Ok((send, high as i32))
}

/// Sends `fd` over the unix socket `sock` (SCM_RIGHTS, one byte of data).
pub fn send_fd(sock: &impl AsRawFd, fd: RawFd) -> io::Result<()> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg describes `control`, which has room for one cmsg with one
    // int; CMSG_FIRSTHDR/CMSG_DATA point inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd);
    }
    // SAFETY: msg and everything it points to live across the call.
    check(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) } as libc::c_long).map(drop)
}

/// A copy of fd `fd` of process `pid` in cryopod (`pidfd_open` +
/// `pidfd_getfd`): the same open file description.
pub fn fd_of(pid: Pid, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes integers.
    let pidfd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid.0, 0) })? as RawFd;
    // SAFETY: pidfd was just returned and is owned by nobody else.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // SAFETY: pidfd_getfd takes integers.
    let got =
        check(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })? as RawFd;
    // SAFETY: got is a new fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(got) })
}

fn sockopt_int(fd: &impl AsRawFd, level: i32, name: i32) -> io::Result<i32> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v and len are valid out pointers of the sizes given.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    } as libc::c_long)?;
    Ok(v)
}

/// `getsockopt(SO_DOMAIN)` and `getsockopt(SO_TYPE)`.
pub fn socket_kind(fd: &impl AsRawFd) -> io::Result<(i32, i32)> {
    Ok((
        sockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?,
        sockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)?,
    ))
}

/// Whether a unix socket is bound to a name (or abstract address): only
/// unnamed sockets (from socketpair) are restored.
pub fn unix_socket_named(fd: &impl AsRawFd) -> io::Result<bool> {
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: addr/len describe a writable sockaddr_un.
    check(unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut addr as *mut libc::sockaddr_un).cast(),
            &mut len,
        )
    } as libc::c_long)?;
    Ok(len as usize > std::mem::size_of::<libc::sa_family_t>())
}

/// Everything queued for reading on a socket, message by message, without
/// taking it: `SO_PEEK_OFF` walks the queue with `MSG_PEEK`, then is
/// switched off again.
pub fn peek_queue(fd: &impl AsRawFd) -> io::Result<Vec<Vec<u8>>> {
    let set_peek_off = |v: libc::c_int| {
        // SAFETY: v is a valid int option value.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEEK_OFF,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        } as libc::c_long)
    };
    set_peek_off(0)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 << 10];
    let result = loop {
        // SAFETY: buf is writable for its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                break Ok(());
            }
            break Err(e);
        }
        if n == 0 {
            break Ok(());
        }
        out.push(buf[..n as usize].to_vec());
    };
    set_peek_off(-1)?;
    result.map(|()| out)
}

/// `socketpair(AF_UNIX, kind | SOCK_CLOEXEC)`.
pub fn unix_pair(kind: i32) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut sv = [0i32; 2];
    // SAFETY: sv has room for the two fds.
    check(
        unsafe { libc::socketpair(libc::AF_UNIX, kind | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) }
            as libc::c_long,
    )?;
    // SAFETY: both fds were just made and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) })
}

/// `send(fd, data, MSG_DONTWAIT)`, all of it as one message.
pub fn send_all(fd: &impl AsRawFd, data: &[u8]) -> io::Result<()> {
    // SAFETY: data is readable for its length.
    let n = check(unsafe {
        libc::send(
            fd.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT,
        )
    } as libc::c_long)?;
    if n as usize != data.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short send"));
    }
    Ok(())
}

/// The peer inode of every unix socket on the machine, from sock_diag
/// (`NETLINK_SOCK_DIAG`, `UNIX_DIAG_PEER`): socket inode -> peer inode.
pub fn unix_peers() -> io::Result<std::collections::HashMap<u64, u64>> {
    const NETLINK_SOCK_DIAG: i32 = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const UDIAG_SHOW_PEER: u32 = 4;
    const UNIX_DIAG_PEER: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const NLMSG_ERROR: u16 = 2;
    // SAFETY: socket takes integers.
    let fd = check(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    } as libc::c_long)? as RawFd;
    // SAFETY: fd was just made and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // nlmsghdr (16 bytes) + unix_diag_req (24 bytes)
    let mut req = Vec::with_capacity(40);
    req.extend_from_slice(&40u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid
    req.push(libc::AF_UNIX as u8);
    req.push(0);
    req.extend_from_slice(&0u16.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // all states
    req.extend_from_slice(&0u32.to_ne_bytes()); // ino
    req.extend_from_slice(&UDIAG_SHOW_PEER.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes());
    // SAFETY: req is readable for its length.
    check(
        unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } as libc::c_long,
    )?;
    let mut peers = std::collections::HashMap::new();
    let mut buf = vec![0u8; 64 << 10];
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    loop {
        // SAFETY: buf is writable for its length.
        let n = check(
            unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) }
                as libc::c_long,
        )? as usize;
        let mut at = 0;
        while at + 16 <= n {
            let len = u32_at(&buf, at) as usize;
            let ty = u16_at(&buf, at + 4);
            if len < 16 || at + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad sock_diag message",
                ));
            }
            match ty {
                NLMSG_DONE => return Ok(peers),
                NLMSG_ERROR => {
                    return Err(io::Error::other("sock_diag refused the dump"));
                }
                _ => {}
            }
            // unix_diag_msg: family, type, state, pad, ino (u32), cookie[2]
            let msg = &buf[at + 16..at + len];
            if msg.len() >= 16 {
                let ino = u32_at(msg, 4) as u64;
                let mut a = 16;
                while a + 4 <= msg.len() {
                    let alen = u16_at(msg, a) as usize;
                    let aty = u16_at(msg, a + 2);
                    if alen < 4 || a + alen > msg.len() {
                        break;
                    }
                    if aty == UNIX_DIAG_PEER && alen >= 8 {
                        peers.insert(ino, u32_at(msg, a + 4) as u64);
                    }
                    a += (alen + 3) & !3;
                }
            }
            at += (len + 3) & !3;
        }
        if n == 0 {
            return Ok(peers);
        }
    }
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn note_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// From now on SIGINT, SIGTERM, SIGHUP and SIGQUIT only raise a flag
/// (`interrupted`), so that a dump can stop at a safe point and let the
/// frozen tree go as it was, instead of dying with it half-handled.
pub fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: sigaction is plain data; the handler only stores to an
        // atomic, which is async-signal-safe.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = note_interrupt as *const () as usize;
            act.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut act.sa_mask);
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
    }
}

/// Whether one of the signals `catch_interrupts` watches has arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

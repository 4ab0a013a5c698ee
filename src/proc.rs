//! What dump reads of a task from /proc: its mappings, mm fields, files,
//! limits and personality. The `procfs` crate parses the common files; the
//! few it does not cover (auxv bytes, fdinfo, pagemap) are read here.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use procfs::process::{FDTarget, MMapPath, Process};

use crate::arch::Abi;
use crate::error::{Error, Result};
use crate::image::{Fd, FdKind, FileState, MmState, Prot, Rlimit, VmFlags, Vma, VmaKind};
use crate::sys::Pid;

fn proc_path(pid: Pid, what: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{what}"))
}

fn procfs_err(pid: Pid, what: &str, e: procfs::ProcError) -> Error {
    let path = proc_path(pid, what);
    match e {
        procfs::ProcError::NotFound(_) => Error::NoSuchProcess(pid),
        procfs::ProcError::Io(io, _) => Error::proc(path, io),
        other => Error::ProcFormat {
            path,
            problem: other.to_string(),
        },
    }
}

pub fn process(pid: Pid) -> Result<Process> {
    if !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(Error::NoSuchProcess(pid));
    }
    Process::new(pid.0).map_err(|e| procfs_err(pid, "", e))
}

/// The task's ABI, from the ELF class of its executable.
pub fn abi(pid: Pid) -> Result<Abi> {
    let path = proc_path(pid, "exe");
    let mut ident = [0u8; 5];
    File::open(&path)
        .and_then(|mut f| f.read_exact(&mut ident))
        .map_err(|e| Error::proc(&path, e))?;
    Abi::from_elf_ident(&ident).ok_or_else(|| Error::ProcFormat {
        path,
        problem: "the executable is not an ELF file".into(),
    })
}

/// Thread ids of the process.
pub fn threads(pid: Pid) -> Result<Vec<Pid>> {
    let path = proc_path(pid, "task");
    let mut out = Vec::new();
    for e in fs::read_dir(&path).map_err(|e| Error::proc(&path, e))? {
        let e = e.map_err(|e| Error::proc(&path, e))?;
        if let Some(tid) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(Pid(tid));
        }
    }
    out.sort();
    Ok(out)
}

pub fn comm(pid: Pid) -> Result<String> {
    let path = proc_path(pid, "comm");
    let s = fs::read_to_string(&path).map_err(|e| Error::proc(&path, e))?;
    Ok(s.trim_end_matches('\n').to_string())
}

/// Where a process sits in the tree, from /proc/PID/stat.
pub struct Ids {
    pub state: char,
    pub ppid: Pid,
    pub pgid: Pid,
    pub sid: Pid,
    /// The wait status of a zombie.
    pub exit_code: i32,
}

pub fn ids(pid: Pid) -> Result<Ids> {
    let stat = process(pid)?
        .stat()
        .map_err(|e| procfs_err(pid, "stat", e))?;
    Ok(Ids {
        state: stat.state,
        ppid: Pid(stat.ppid),
        pgid: Pid(stat.pgrp),
        sid: Pid(stat.session),
        exit_code: stat.exit_code.unwrap_or(0),
    })
}

/// Children of every thread of the process.
pub fn children(pid: Pid) -> Result<Vec<Pid>> {
    let mut out = Vec::new();
    for tid in threads(pid)? {
        let path = proc_path(pid, &format!("task/{tid}/children"));
        let text = fs::read_to_string(&path).map_err(|e| Error::proc(&path, e))?;
        out.extend(
            text.split_whitespace()
                .filter_map(|s| s.parse().ok())
                .map(Pid),
        );
    }
    Ok(out)
}

/// The task's mappings, classified for restore.
pub fn vmas(pid: Pid) -> Result<Vec<Vma>> {
    let maps = process(pid)?
        .smaps()
        .map_err(|e| procfs_err(pid, "smaps", e))?;
    let mut out = Vec::new();
    for m in maps {
        use procfs::process::MMPermissions as P;
        let shared = m.perms.contains(P::SHARED);
        let unsupported = |what: String| Error::Unsupported { pid, what };
        let kind = match &m.pathname {
            MMapPath::Anonymous | MMapPath::Heap | MMapPath::Stack => {
                if shared {
                    VmaKind::SharedAnon {
                        inode: m.inode,
                        offset: m.offset,
                    }
                } else {
                    VmaKind::Anon
                }
            }
            MMapPath::Vdso => VmaKind::Vdso {
                name: "[vdso]".into(),
            },
            MMapPath::Vvar => VmaKind::Vdso {
                name: "[vvar]".into(),
            },
            MMapPath::Other(name) if name.trim_start_matches('[').starts_with("vvar") => {
                VmaKind::Vdso {
                    name: format!("[{}]", name.trim_matches(['[', ']'])),
                }
            }
            MMapPath::Vsyscall => VmaKind::Vsyscall,
            MMapPath::Path(p) if shared && p.as_os_str() == "/dev/zero (deleted)" => {
                VmaKind::SharedAnon {
                    inode: m.inode,
                    offset: m.offset,
                }
            }
            // A shared mapping of a deleted file (a POSIX semaphore or shm
            // object after shm_unlink): its pages are all there is of it,
            // so it is saved and made again like shared anonymous memory.
            // Shortcoming: /proc then names it /dev/zero, not the old path.
            MMapPath::Path(p) if shared && p.to_string_lossy().ends_with(" (deleted)") => {
                VmaKind::SharedAnon {
                    inode: m.inode,
                    offset: m.offset,
                }
            }
            MMapPath::Path(p) => {
                if p.to_string_lossy().ends_with(" (deleted)") {
                    return Err(unsupported(format!(
                        "mapping {:#x}-{:#x} of deleted file {}",
                        m.address.0,
                        m.address.1,
                        p.display()
                    )));
                }
                VmaKind::File {
                    path: p.clone(),
                    offset: m.offset,
                    dev: m.dev,
                    inode: m.inode,
                    size: fs::metadata(proc_path(
                        pid,
                        &format!("map_files/{:x}-{:x}", m.address.0, m.address.1),
                    ))
                    .or_else(|_| fs::metadata(p))
                    .map(|md| md.len())
                    .unwrap_or(0),
                }
            }
            other => {
                return Err(unsupported(format!(
                    "mapping {:#x}-{:#x} of kind {other:?}",
                    m.address.0, m.address.1
                )));
            }
        };
        out.push(Vma {
            start: m.address.0,
            end: m.address.1,
            prot: Prot {
                read: m.perms.contains(P::READ),
                write: m.perms.contains(P::WRITE),
                exec: m.perms.contains(P::EXECUTE),
            },
            shared,
            growsdown: m.extension.vm_flags.contains(procfs::process::VmFlags::GD),
            flags: vm_flags(m.extension.vm_flags),
            resident: ["Rss", "Swap"]
                .iter()
                .filter_map(|k| m.extension.map.get(*k))
                .sum(),
            kind,
        });
    }
    Ok(out)
}

fn vm_flags(f: procfs::process::VmFlags) -> VmFlags {
    use procfs::process::VmFlags as F;
    VmFlags {
        account: f.contains(F::AC),
        noreserve: f.contains(F::NR),
        dontdump: f.contains(F::DD),
        dontfork: f.contains(F::DC),
        wipeonfork: f.contains(F::WF),
        hugepage: f.contains(F::HG),
        nohugepage: f.contains(F::NH),
    }
}

/// The mm fields from /proc/PID/stat, the auxv bytes and the exe link.
/// `brk` is not in /proc; the caller fills it in.
pub fn mm_state(pid: Pid) -> Result<MmState> {
    let stat = process(pid)?
        .stat()
        .map_err(|e| procfs_err(pid, "stat", e))?;
    let need = |v: Option<u64>, name: &str| {
        v.ok_or_else(|| Error::ProcFormat {
            path: proc_path(pid, "stat"),
            problem: format!("no {name} field (kernel too old?)"),
        })
    };
    let auxv_path = proc_path(pid, "auxv");
    let auxv = fs::read(&auxv_path).map_err(|e| Error::proc(&auxv_path, e))?;
    let exe_path = proc_path(pid, "exe");
    let exe = fs::read_link(&exe_path).map_err(|e| Error::proc(&exe_path, e))?;
    Ok(MmState {
        start_code: stat.startcode,
        end_code: stat.endcode,
        start_data: need(stat.start_data, "start_data")?,
        end_data: need(stat.end_data, "end_data")?,
        start_brk: need(stat.start_brk, "start_brk")?,
        brk: 0,
        start_stack: stat.startstack,
        arg_start: need(stat.arg_start, "arg_start")?,
        arg_end: need(stat.arg_end, "arg_end")?,
        env_start: need(stat.env_start, "env_start")?,
        env_end: need(stat.env_end, "env_end")?,
        auxv,
        exe,
    })
}

/// Position and flags from /proc/PID/fdinfo/FD.
fn fdinfo(pid: Pid, fd: i32) -> Result<(u64, u32)> {
    let path = proc_path(pid, &format!("fdinfo/{fd}"));
    let text = fs::read_to_string(&path).map_err(|e| Error::proc(&path, e))?;
    parse_fdinfo(&text).ok_or_else(|| Error::ProcFormat {
        path,
        problem: "no pos/flags lines".into(),
    })
}

fn parse_fdinfo(text: &str) -> Option<(u64, u32)> {
    let mut pos = None;
    let mut flags = None;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("pos:") {
            pos = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("flags:") {
            flags = u32::from_str_radix(v.trim(), 8).ok();
        }
    }
    Some((pos?, flags?))
}

/// What kind of thing a non-path fd is, in plain words.
fn describe_fd(target: &FDTarget) -> String {
    match target {
        FDTarget::Pipe(ino) => format!("a pipe (pipe:[{ino}])"),
        FDTarget::Socket(ino) | FDTarget::Net(ino) => format!("a socket (socket:[{ino}])"),
        FDTarget::AnonInode(what) => format!("an anonymous inode ({what})"),
        FDTarget::MemFD(name) => format!("a memfd ({name})"),
        FDTarget::Other(what, ino) => format!("{what}:[{ino}]"),
        FDTarget::Unknown(a, b) => format!("{a} {b}"),
        FDTarget::Path(p) => p.display().to_string(),
    }
}

/// Open files, cwd, root and umask.
pub fn files(pid: Pid) -> Result<FileState> {
    let p = process(pid)?;
    let mut fds = Vec::new();
    for info in p.fd().map_err(|e| procfs_err(pid, "fd", e))? {
        let info = info.map_err(|e| procfs_err(pid, "fd", e))?;
        let fd = info.fd;
        let unsupported = |what: String| Error::Unsupported { pid, what };
        let path = match &info.target {
            FDTarget::Path(path) => path.clone(),
            FDTarget::Pipe(ino) | FDTarget::Socket(ino) => {
                let (pos, flags) = fdinfo(pid, fd)?;
                let (kind, what) = match &info.target {
                    FDTarget::Pipe(_) => (FdKind::Pipe, "pipe"),
                    _ => (FdKind::Socket, "socket"),
                };
                fds.push(Fd {
                    fd,
                    kind,
                    path: PathBuf::from(format!("{what}:[{ino}]")),
                    flags,
                    pos,
                    dup_of: None,
                    shared: None,
                });
                continue;
            }
            other => return Err(unsupported(format!("fd {fd}, {}", describe_fd(other)))),
        };
        if path.to_string_lossy().ends_with(" (deleted)") {
            return Err(unsupported(format!(
                "fd {fd} on deleted file {}",
                path.display()
            )));
        }
        let link = proc_path(pid, &format!("fd/{fd}"));
        let meta = fs::metadata(&link).map_err(|e| Error::proc(&link, e))?;
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            FdKind::Regular
        } else if ft.is_dir() {
            FdKind::Directory
        } else if ft.is_char_device() {
            FdKind::CharDevice
        } else if ft.is_fifo() {
            FdKind::Fifo
        } else {
            return Err(unsupported(format!(
                "fd {fd} on {} (not a regular file, directory or character device)",
                path.display()
            )));
        };
        if kind == FdKind::CharDevice && (meta.rdev() >> 8) & 0xfff == 136 {
            // Pseudo-terminals need their session and master side; they are
            // not handled yet, and reopening one by path would steal another
            // session's terminal.
            return Err(unsupported(format!(
                "fd {fd} on terminal {}",
                path.display()
            )));
        }
        let (pos, flags) = fdinfo(pid, fd)?;
        fds.push(Fd {
            fd,
            kind,
            path,
            flags,
            pos,
            dup_of: None,
            shared: None,
        });
    }
    fds.sort_by_key(|f| f.fd);
    for i in 0..fds.len() {
        let earlier = fds[..i]
            .iter()
            .filter(|e| e.dup_of.is_none() && e.path == fds[i].path);
        for e in earlier {
            let same =
                crate::sys::same_open_file(pid, e.fd, fds[i].fd).map_err(|source| Error::Sys {
                    call: "kcmp(KCMP_FILE)",
                    pid,
                    source,
                })?;
            if same {
                fds[i].dup_of = Some(e.fd);
                break;
            }
        }
    }
    let status = p.status().map_err(|e| procfs_err(pid, "status", e))?;
    let link = |what: &str| {
        let path = proc_path(pid, what);
        fs::read_link(&path).map_err(|e| Error::proc(&path, e))
    };
    Ok(FileState {
        fds,
        cwd: link("cwd")?,
        root: link("root")?,
        umask: status.umask.unwrap_or(0o022),
    })
}

pub fn rlimits(pid: Pid) -> Result<Vec<Rlimit>> {
    use procfs::process::LimitValue;
    let l = process(pid)?
        .limits()
        .map_err(|e| procfs_err(pid, "limits", e))?;
    let val = |v: &LimitValue| match v {
        LimitValue::Unlimited => u64::MAX,
        LimitValue::Value(n) => *n,
    };
    let all = [
        &l.max_cpu_time,
        &l.max_file_size,
        &l.max_data_size,
        &l.max_stack_size,
        &l.max_core_file_size,
        &l.max_resident_set,
        &l.max_processes,
        &l.max_open_files,
        &l.max_locked_memory,
        &l.max_address_space,
        &l.max_file_locks,
        &l.max_pending_signals,
        &l.max_msgqueue_size,
        &l.max_nice_priority,
        &l.max_realtime_priority,
        &l.max_realtime_timeout,
    ];
    Ok(all
        .iter()
        .enumerate()
        .map(|(i, lim)| Rlimit {
            resource: i as u32,
            soft: val(&lim.soft_limit),
            hard: val(&lim.hard_limit),
        })
        .collect())
}

pub fn personality(pid: Pid) -> Result<u32> {
    let path = proc_path(pid, "personality");
    let s = fs::read_to_string(&path).map_err(|e| Error::proc(&path, e))?;
    u32::from_str_radix(s.trim(), 16).map_err(|e| Error::ProcFormat {
        path,
        problem: e.to_string(),
    })
}

/// `/proc/PID/pagemap` of one task, read in ranges.
pub struct Pagemap {
    file: File,
    path: PathBuf,
}

pub const PM_PRESENT: u64 = 1 << 63;
pub const PM_SWAP: u64 = 1 << 62;
pub const PM_FILE: u64 = 1 << 61;

impl Pagemap {
    pub fn open(pid: Pid) -> Result<Pagemap> {
        let path = proc_path(pid, "pagemap");
        let file = File::open(&path).map_err(|e| Error::proc(&path, e))?;
        Ok(Pagemap { file, path })
    }

    /// One 64-bit entry per page of `[start, end)`.
    pub fn read(&self, start: u64, end: u64) -> Result<Vec<u64>> {
        let n = ((end - start) / 4096) as usize;
        let mut buf = vec![0u8; n * 8];
        self.file
            .read_exact_at(&mut buf, start / 4096 * 8)
            .map_err(|e| Error::proc(&self.path, e))?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect())
    }
}

const LOW_LIMIT: u64 = 0x1_0000;
const FOUR_GIB: u64 = 1 << 32;
const PAGE: u64 = 4096;

/// The lowest page-aligned hole of `len` bytes below 4 GiB that none of
/// the `used` ranges touch, with a guard page on each side.
pub fn find_hole(used: &mut [(u64, u64)], len: u64) -> Option<u64> {
    used.sort();
    // Start a little above the lowest legal address; keep a guard page.
    let mut at = LOW_LIMIT * 16;
    for &(start, end) in used.iter() {
        if start >= at + len + PAGE {
            break;
        }
        at = at.max(end + PAGE);
    }
    (at + len <= FOUR_GIB).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hole_skips_used_ranges_and_keeps_guard_pages() {
        let base = LOW_LIMIT * 16;
        let mut used = vec![(base, base + 0x5000), (base + 0x20000, base + 0x30000)];
        assert_eq!(find_hole(&mut used, 0x11000), Some(base + 0x6000));
        let mut tight = vec![(base, base + 0x5000), (base + 0x10000, base + 0x30000)];
        assert_eq!(find_hole(&mut tight, 0x11000), Some(base + 0x31000));
        let mut full = vec![(0, FOUR_GIB)];
        assert_eq!(find_hole(&mut full, 0x1000), None);
    }

    #[test]
    fn fdinfo_of_a_real_kernel() {
        let text = "pos:\t1234\nflags:\t02102002\nmnt_id:\t27\nino:\t5\n";
        assert_eq!(parse_fdinfo(text), Some((1234, 0o2102002)));
        assert_eq!(parse_fdinfo("mnt_id: 3\n"), None);
    }

    #[test]
    fn own_process_reads() {
        let me = Pid(std::process::id() as i32);
        assert_eq!(abi(me).unwrap(), Abi::X86_64);
        let vmas = vmas(me).unwrap();
        assert!(vmas.iter().any(|v| v.growsdown));
        assert!(vmas.iter().any(|v| matches!(v.kind, VmaKind::Vdso { .. })));
        let mm = mm_state(me).unwrap();
        assert!(mm.start_code < mm.end_code && mm.arg_start < mm.arg_end);
        assert_eq!(rlimits(me).unwrap().len(), 16);
    }

    #[test]
    fn missing_pid_is_named() {
        let e = abi(Pid(i32::MAX)).unwrap_err();
        assert!(
            e.to_string().contains(&format!("/proc/{}/exe", i32::MAX)),
            "{e}"
        );
    }
}

//! The saved state of a process, as plain data. Every field is something the
//! restorer puts back; nothing here refers to the live task.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::arch::{Abi, Regs};
use crate::sys::{Pid, UserDesc};

/// `inventory.img`: what the image holds. Written last, so its presence
/// means the dump completed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Inventory {
    pub tool_version: String,
    pub kernel_release: String,
    pub root_pid: Pid,
    /// Every live process of the tree, each after its parent.
    pub tasks: Vec<Pid>,
    /// Children that exited and were not yet reaped by their parent.
    pub zombies: Vec<Zombie>,
    /// Open files shared between processes, and pipe ends.
    pub files: Vec<SharedFile>,
    pub pipes: Vec<PipeState>,
    pub sockets: Vec<SocketState>,
    /// Seconds since the epoch when the tree was frozen.
    pub dumped_at: u64,
}

/// `task-PID.img`: everything about one process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskImage {
    pub pid: Pid,
    /// Parent, process group and session as /proc showed them.
    pub ppid: Pid,
    pub pgid: Pid,
    pub sid: Pid,
    pub comm: String,
    pub abi: Abi,
    /// Every thread, the main one (tid == pid) first.
    pub threads: Vec<ThreadImage>,
    /// Entries of the process LDT that are in use.
    pub ldt: Vec<UserDesc>,
    pub signals: SignalState,
    pub mm: MmState,
    pub vmas: Vec<Vma>,
    pub pages: Vec<PageRun>,
    /// Total pages in `pages-PID.img` after its header page.
    pub page_count: u64,
    /// CRC-32 of the pages file after its header page.
    pub pages_crc: u32,
    pub files: FileState,
    pub rlimits: Vec<Rlimit>,
    pub personality: u32,
    /// PR_SET_CHILD_SUBREAPER: orphaned descendants are reparented here.
    pub child_subreaper: bool,
    /// Stopped by a signal (SIGSTOP, SIGTSTP...) when dumped.
    pub stopped: bool,
}

impl TaskImage {
    pub fn main_thread(&self) -> Option<&ThreadImage> {
        self.threads.first()
    }
}

/// A process that exited and waits for its parent to reap it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zombie {
    pub pid: Pid,
    pub ppid: Pid,
    pub pgid: Pid,
    pub sid: Pid,
    /// Its wait status, as waitpid would report it.
    pub status: i32,
}

/// The state of one thread.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ThreadImage {
    pub tid: Pid,
    /// Registers as read, before any syscall-restart adjustment.
    pub regs: Regs,
    /// XSAVE area (x87, SSE, AVX...) in this CPU's layout.
    #[serde(with = "hex_bytes")]
    pub xstate: Vec<u8>,
    /// The three GDT TLS slots (entries 12-14); empty ones are kept too.
    pub tls: Vec<UserDesc>,
    pub blocked: u64,
    /// Signals queued on the thread, oldest first (64-bit siginfo layout).
    pub pending: Vec<SigInfo>,
    /// The alternate signal stack, if one is set.
    pub altstack: Option<AltStack>,
    /// The rseq area the thread registered (glibc does at start).
    pub rseq: Option<Rseq>,
    /// The robust futex list head (`set_robust_list`), in the task's width.
    pub robust_list: Option<RobustList>,
    /// `set_tid_address` pointer: cleared and woken at exit (pthread_join).
    pub clear_child_tid: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rseq {
    pub addr: u64,
    pub len: u32,
    pub sig: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RobustList {
    pub head: u64,
    pub len: u64,
}

/// Process-wide signal state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SignalState {
    /// Actions that are not SIG_DFL.
    pub actions: Vec<SigAction>,
    /// Queued on the process, oldest first.
    pub pending_process: Vec<SigInfo>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AltStack {
    pub sp: u64,
    pub flags: u32,
    pub size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigAction {
    pub signo: u32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigInfo {
    pub signo: u32,
    #[serde(with = "hex_bytes")]
    pub raw: Vec<u8>,
}

/// The mm fields that PR_SET_MM_MAP sets.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MmState {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
    /// Raw bytes of /proc/PID/auxv, in the task's own word size.
    #[serde(with = "hex_bytes")]
    pub auxv: Vec<u8>,
    pub exe: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prot {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

impl Prot {
    pub fn bits(self) -> u64 {
        let bit = |on: bool, b: i32| if on { b as u64 } else { 0 };
        bit(self.read, libc::PROT_READ)
            | bit(self.write, libc::PROT_WRITE)
            | bit(self.exec, libc::PROT_EXEC)
    }
}

/// What backs a mapping.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum VmaKind {
    /// Private anonymous memory (heap, stack, bss, malloc arenas).
    Anon,
    /// MAP_SHARED|MAP_ANONYMOUS memory: a shmem object, the same `inode`
    /// in every process that shares it; `offset` into it in bytes.
    SharedAnon { inode: u64, offset: u64 },
    /// A file mapping; `offset` in bytes.
    File {
        path: PathBuf,
        offset: u64,
        dev: (i32, i32),
        inode: u64,
        /// The file's size when dumped, to notice a file that changed.
        size: u64,
    },
    /// `[vvar]`, `[vvar_vclock]` and `[vdso]`: recreated by the kernel.
    Vdso { name: String },
    /// `[vsyscall]`: present in every 64-bit exec'd task, never restored.
    Vsyscall,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub prot: Prot,
    pub shared: bool,
    pub growsdown: bool,
    pub flags: VmFlags,
    pub kind: VmaKind,
    /// Bytes resident or swapped when dumped (smaps Rss + Swap): a mapping
    /// with none has no page to look for.
    pub resident: u64,
}

/// Kernel VMA flags (from smaps `VmFlags`) that restore reproduces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFlags {
    /// `ac`: memory accounted as writable (it was writable at some point).
    /// Two neighbours that differ only in this do not merge, so keeping it
    /// keeps the mapping list exactly as it was.
    pub account: bool,
    /// `nr`: MAP_NORESERVE.
    pub noreserve: bool,
    /// `dd`: MADV_DONTDUMP.
    pub dontdump: bool,
    /// `dc`: MADV_DONTFORK.
    pub dontfork: bool,
    /// `wf`: MADV_WIPEONFORK.
    pub wipeonfork: bool,
    /// `hg`: MADV_HUGEPAGE.
    pub hugepage: bool,
    /// `nh`: MADV_NOHUGEPAGE.
    pub nohugepage: bool,
}

impl Vma {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Whether the restorer creates this mapping itself.
    pub fn is_restored(&self) -> bool {
        !matches!(self.kind, VmaKind::Vdso { .. } | VmaKind::Vsyscall)
    }
}

/// A run of consecutive pages saved in the pages file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    pub addr: u64,
    pub pages: u64,
    /// Index of the first page in the pages file (after its header page).
    pub first: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileState {
    pub fds: Vec<Fd>,
    pub cwd: PathBuf,
    pub root: PathBuf,
    pub umask: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FdKind {
    Regular,
    Directory,
    CharDevice,
    /// One end of a pipe; `path` reads `pipe:[INODE]`.
    Pipe,
    /// A named pipe (FIFO), opened by its path.
    Fifo,
    /// One end of an unnamed unix socket pair; `path` reads `socket:[INODE]`.
    Socket,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fd {
    pub fd: i32,
    pub kind: FdKind,
    pub path: PathBuf,
    /// Open flags as in fdinfo, O_CLOEXEC included.
    pub flags: u32,
    pub pos: u64,
    /// A lower fd sharing this one's open file description (offset and
    /// flags): restored as a dup of it.
    pub dup_of: Option<i32>,
    /// The entry of `Inventory::files` this fd is one holder of, for open
    /// files shared between processes and for every pipe.
    pub shared: Option<u32>,
}

/// An open file description held by more than one process, or a pipe end:
/// cryopod makes it once at restore and hands it to every holder.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SharedFile {
    pub id: u32,
    pub kind: FdKind,
    pub path: PathBuf,
    pub flags: u32,
    pub pos: u64,
    /// For a pipe end: the pipe's inode, a key into `Inventory::pipes`.
    pub pipe: Option<u64>,
    /// For a socket: its inode, a key into `Inventory::sockets`.
    pub socket: Option<u64>,
}

/// One end of a unix socket pair and what was queued for it to read.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SocketState {
    pub ino: u64,
    /// The other end's inode; 0 when it was closed.
    pub peer: u64,
    /// SOCK_STREAM, SOCK_DGRAM or SOCK_SEQPACKET.
    pub kind: i32,
    /// Queued messages (for a stream, chunks of the byte stream).
    pub queued: Vec<Message>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Message(#[serde(with = "hex_bytes")] pub Vec<u8>);

/// A pipe and what was buffered in it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PipeState {
    pub ino: u64,
    pub capacity: u32,
    #[serde(with = "hex_bytes")]
    pub data: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// Hex strings for byte blobs, so that `cryopod show` stays readable.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            out.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(D::Error::custom("odd-length hex string"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(D::Error::custom))
            .collect()
    }
}

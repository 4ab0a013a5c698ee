//! Files that more than one restored process holds (one open file
//! description), and pipes with what was buffered in them. cryopod makes
//! each once, in its own process, and hands it to every holder over a unix
//! socket whose receiving end every stub inherited: `sendmsg(SCM_RIGHTS)`
//! here, `recvmsg` injected there.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use tracing::debug;

use crate::arch::nr;
use crate::error::{Error, Result};
use crate::image::{FdKind, Inventory, PipeState};
use crate::sys;

use super::Builder;

const MSGHDR_LEN: usize = 56;
const F_SETFL: u64 = 4;

/// An image that refers to state it does not hold.
fn missing(b: &Builder, what: String) -> Error {
    Error::Restore {
        pid: b.pid,
        problem: format!("no saved state for {what} in the inventory"),
    }
}

pub struct Shared<'a> {
    inv: &'a Inventory,
    send: OwnedFd,
    recv_fd: i32,
    files: HashMap<u32, OwnedFd>,
    pipes: HashMap<u64, (OwnedFd, OwnedFd)>,
    fifos: HashMap<(u64, bool), OwnedFd>,
    fifo_holders: HashMap<u64, OwnedFd>,
    sockets: HashMap<u64, OwnedFd>,
}

impl<'a> Shared<'a> {
    /// Opens the courier; call before the first stub is made, so that it
    /// inherits the receiving end.
    pub fn new(inv: &'a Inventory) -> Result<Shared<'a>> {
        let (send, recv_fd) = sys::courier().map_err(|source| Error::Local {
            call: "socketpair(AF_UNIX) for handing over files",
            source,
        })?;
        Ok(Shared {
            inv,
            send,
            recv_fd,
            files: HashMap::new(),
            pipes: HashMap::new(),
            fifos: HashMap::new(),
            fifo_holders: HashMap::new(),
            sockets: HashMap::new(),
        })
    }

    pub fn courier_fd(&self) -> i32 {
        self.recv_fd
    }

    /// Makes (once) the open file `id` and installs it in the task as `fd`.
    pub fn give(&mut self, b: &Builder, id: u32, fd: i32, cloexec: bool) -> Result<()> {
        let sf = self
            .inv
            .files
            .iter()
            .find(|f| f.id == id)
            .ok_or_else(|| missing(b, format!("shared file {id} (fd {fd})")))?;
        let local = match (sf.pipe, sf.socket) {
            (_, Some(ino)) => self.socket_end(b, ino)?.as_raw_fd(),
            (Some(ino), _) if sf.kind == FdKind::Fifo => {
                self.fifo_end(b, ino, &sf.path, sf.flags)?.as_raw_fd()
            }
            (Some(ino), _) => self.pipe_end(b, ino, sf.flags)?.as_raw_fd(),
            (None, None) => self.file(b, id)?.as_raw_fd(),
        };
        sys::send_fd(&self.send, local).map_err(|source| Error::Local {
            call: "sendmsg(SCM_RIGHTS)",
            source,
        })?;
        let got = self.receive(b)?;
        let target = fd as u64;
        if got != target {
            let flags = if cloexec { libc::O_CLOEXEC as u64 } else { 0 };
            b.inj.call(
                "dup3",
                nr::x86_64::DUP3,
                [got, target, flags, 0, 0, 0],
                || format!("fd {got} to {target}"),
            )?;
            b.close(got)?;
        }
        if matches!(sf.kind, FdKind::Pipe | FdKind::Fifo | FdKind::Socket) {
            let keep = (libc::O_NONBLOCK | libc::O_DIRECT) as u32;
            b.inj.call(
                "fcntl(F_SETFL)",
                nr::x86_64::FCNTL,
                [target, F_SETFL, (sf.flags & keep) as u64, 0, 0, 0],
                || format!("fd {target}"),
            )?;
        }
        debug!(pid = %b.pid, fd, id, path = %sf.path.display(), "shared fd handed over");
        Ok(())
    }

    fn file(&mut self, b: &Builder, id: u32) -> Result<&OwnedFd> {
        if !self.files.contains_key(&id) {
            let sf = self
                .inv
                .files
                .iter()
                .find(|f| f.id == id)
                .ok_or_else(|| missing(b, format!("shared file {id}")))?;
            let strip =
                (libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_CLOEXEC | libc::O_ACCMODE)
                    as u32;
            let acc = sf.flags & libc::O_ACCMODE as u32;
            let mut file: File = OpenOptions::new()
                .read(acc != libc::O_WRONLY as u32)
                .write(acc != libc::O_RDONLY as u32)
                .custom_flags(((sf.flags & !strip) | libc::O_NOCTTY as u32) as i32)
                .open(&sf.path)
                .map_err(|e| Error::Restore {
                    pid: b.pid,
                    problem: format!("opening {}: {e}", sf.path.display()),
                })?;
            if sf.kind != FdKind::CharDevice {
                file.seek(SeekFrom::Start(sf.pos))
                    .map_err(|e| Error::Restore {
                        pid: b.pid,
                        problem: format!("seeking {} to {}: {e}", sf.path.display(), sf.pos),
                    })?;
            }
            self.files.insert(id, OwnedFd::from(file));
        }
        Ok(&self.files[&id])
    }

    fn pipe_end(&mut self, b: &Builder, ino: u64, flags: u32) -> Result<&OwnedFd> {
        if !self.pipes.contains_key(&ino) {
            let state = self.saved_pipe(b, ino, || format!("pipe:[{ino}]"))?;
            let io = |call| move |source| Error::Local { call, source };
            let (r, w) = sys::pipe().map_err(io("pipe2"))?;
            sys::set_pipe_capacity(&w, state.capacity.max(state.data.len() as u32))
                .map_err(io("fcntl(F_SETPIPE_SZ)"))?;
            let w = OwnedFd::from({
                let mut f = File::from(w);
                f.write_all(&state.data)
                    .map_err(io("write(pipe contents)"))?;
                f
            });
            self.pipes.insert(ino, (r, w));
        }
        let (r, w) = &self.pipes[&ino];
        Ok(if flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32 {
            r
        } else {
            w
        })
    }

    /// A named pipe: cryopod holds it open read-write (which never blocks
    /// and keeps its buffer alive), puts the saved bytes back, and opens
    /// each end the holders need without blocking.
    fn fifo_end(
        &mut self,
        b: &Builder,
        ino: u64,
        path: &std::path::Path,
        flags: u32,
    ) -> Result<&OwnedFd> {
        let reader = flags & libc::O_ACCMODE as u32 == libc::O_RDONLY as u32;
        let key = (ino, reader);
        if !self.fifos.contains_key(&key) {
            let err = |what: &str, e: std::io::Error| Error::Restore {
                pid: b.pid,
                problem: format!("{what} FIFO {}: {e}", path.display()),
            };
            if !self.fifo_holders.contains_key(&ino) {
                let state = self.saved_pipe(b, ino, || format!("FIFO {}", path.display()))?;
                let mut holder = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(path)
                    .map_err(|e| err("opening", e))?;
                holder
                    .write_all(&state.data)
                    .map_err(|e| err("refilling", e))?;
                self.fifo_holders.insert(ino, OwnedFd::from(holder));
            }
            let end = OpenOptions::new()
                .read(reader)
                .write(!reader)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| err("opening an end of", e))?;
            self.fifos.insert(key, OwnedFd::from(end));
        }
        Ok(&self.fifos[&key])
    }

    /// One end of a unix socket pair. The pair is made when either end is
    /// first needed; what each end had queued is sent from the other, so it
    /// waits in the right receive queue.
    fn socket_end(&mut self, b: &Builder, ino: u64) -> Result<&OwnedFd> {
        if !self.sockets.contains_key(&ino) {
            let find = |ino: u64| self.inv.sockets.iter().find(|s| s.ino == ino);
            let this = find(ino).ok_or_else(|| missing(b, format!("socket:[{ino}]")))?;
            let io = |call| move |source| Error::Local { call, source };
            let (a, peer_end) = sys::unix_pair(this.kind).map_err(io("socketpair(AF_UNIX)"))?;
            for m in &this.queued {
                sys::send_all(&peer_end, &m.0).map_err(io("send(queued data)"))?;
            }
            if let Some(peer) = find(this.peer).filter(|_| this.peer != 0) {
                for m in &peer.queued {
                    sys::send_all(&a, &m.0).map_err(io("send(queued data)"))?;
                }
                self.sockets.insert(peer.ino, peer_end);
            }
            self.sockets.insert(ino, a);
        }
        Ok(&self.sockets[&ino])
    }

    /// The saved state of pipe or FIFO `ino`.
    fn saved_pipe(
        &self,
        b: &Builder,
        ino: u64,
        what: impl FnOnce() -> String,
    ) -> Result<&'a PipeState> {
        let inv: &'a Inventory = self.inv;
        inv.pipes
            .iter()
            .find(|p| p.ino == ino)
            .ok_or_else(|| missing(b, what()))
    }

    /// Injects `recvmsg` on the courier; returns the fd the task received.
    fn receive(&self, b: &Builder) -> Result<u64> {
        let base = b.scratch();
        let (iov, control, byte) = (base + 64, base + 128, base + 256);
        let mut msg = Vec::with_capacity(MSGHDR_LEN + 64);
        // msg_name, msg_namelen(+pad), msg_iov, msg_iovlen, msg_control,
        // msg_controllen, msg_flags(+pad)
        for w in [0, 0, iov, 1, control, 64, 0] {
            msg.extend_from_slice(&w.to_le_bytes());
        }
        msg.resize(64, 0);
        msg.extend_from_slice(&byte.to_le_bytes());
        msg.extend_from_slice(&1u64.to_le_bytes());
        b.put(0, &msg)?;
        b.put(128, &[0u8; 64])?;
        b.inj.call(
            "recvmsg",
            nr::x86_64::RECVMSG,
            [self.recv_fd as u64, base, 0, 0, 0, 0],
            || format!("on fd {}", self.recv_fd),
        )?;
        let cmsg = sys::read_remote(b.pid, control, 20).map_err(|source| Error::Sys {
            call: "process_vm_readv(cmsg)",
            pid: b.pid,
            source,
        })?;
        let level = i32::from_le_bytes(cmsg[8..12].try_into().unwrap_or_default());
        let kind = i32::from_le_bytes(cmsg[12..16].try_into().unwrap_or_default());
        if cmsg.len() != 20 || level != libc::SOL_SOCKET || kind != libc::SCM_RIGHTS {
            return Err(Error::Restore {
                pid: b.pid,
                problem: "recvmsg brought no file descriptor".into(),
            });
        }
        Ok(i32::from_le_bytes(cmsg[16..20].try_into().unwrap_or_default()) as u64)
    }
}

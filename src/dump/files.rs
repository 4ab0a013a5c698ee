//! Open files across the tree: which fds of different processes are one
//! open file description (`kcmp`), and what is buffered in each pipe. Such
//! files are listed once in the inventory and every holder refers to them,
//! so restore makes each once and hands the same one to all.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

use tracing::debug;

use crate::error::{Error, Result};
use crate::image::{FdKind, FileState, Message, PipeState, SharedFile, SocketState};
use crate::sys::{self, Pid};

/// One open file description and where it was first seen.
struct Group {
    key: (u64, u64),
    pid: Pid,
    fd: i32,
    holders: Vec<Pid>,
}

/// Finds the descriptions shared between processes (and every pipe end),
/// marks their fds, and returns the shared table and the pipes' contents.
pub fn share(files: &mut [(Pid, FileState)]) -> Result<Shares> {
    let mut groups: Vec<Group> = Vec::new();
    let mut of_fd: HashMap<(Pid, i32), usize> = HashMap::new();
    for (pid, state) in files.iter() {
        for f in state.fds.iter().filter(|f| f.dup_of.is_none()) {
            let link = format!("/proc/{pid}/fd/{}", f.fd);
            let meta = fs::metadata(&link).map_err(|e| Error::proc(&link, e))?;
            let key = (meta.dev(), meta.ino());
            let mut found = None;
            for (i, g) in groups.iter().enumerate().filter(|(_, g)| g.key == key) {
                let same =
                    sys::same_open_file_across(*pid, f.fd, g.pid, g.fd).map_err(|source| {
                        Error::Sys {
                            call: "kcmp(KCMP_FILE)",
                            pid: *pid,
                            source,
                        }
                    })?;
                if same {
                    found = Some(i);
                    break;
                }
            }
            let i = found.unwrap_or_else(|| {
                groups.push(Group {
                    key,
                    pid: *pid,
                    fd: f.fd,
                    holders: Vec::new(),
                });
                groups.len() - 1
            });
            groups[i].holders.push(*pid);
            of_fd.insert((*pid, f.fd), i);
        }
    }

    refuse_outside_pipes(files)?;
    let mut shared = Vec::new();
    let mut pipes: Vec<PipeState> = Vec::new();
    let mut sockets: Vec<SocketState> = Vec::new();
    let tree_sockets: Vec<u64> = files
        .iter()
        .flat_map(|(_, s)| s.fds.iter())
        .filter(|f| f.kind == FdKind::Socket)
        .map(|f| socket_ino(&f.path))
        .collect();
    let peers = if tree_sockets.is_empty() {
        HashMap::new()
    } else {
        sys::unix_peers().map_err(|source| Error::Local {
            call: "sock_diag (unix socket peers)",
            source,
        })?
    };
    let mut ids: HashMap<usize, u32> = HashMap::new();
    for (pid, state) in files.iter_mut() {
        for f in state.fds.iter_mut() {
            let Some(&gi) = of_fd.get(&(*pid, f.dup_of.unwrap_or(f.fd))) else {
                continue;
            };
            let g = &groups[gi];
            let across = g.holders.iter().any(|h| h != &g.pid);
            let pipe_like = matches!(f.kind, FdKind::Pipe | FdKind::Fifo);
            if !pipe_like && f.kind != FdKind::Socket && !across {
                continue;
            }
            let next = ids.len() as u32;
            let id = *ids.entry(gi).or_insert(next);
            if id == next {
                let pipe = if pipe_like {
                    let ino = g.key.1;
                    if !pipes.iter().any(|p| p.ino == ino) {
                        pipes.push(read_pipe(g.pid, g.fd, ino)?);
                    }
                    Some(ino)
                } else {
                    None
                };
                let socket = if f.kind == FdKind::Socket {
                    let ino = socket_ino(&f.path);
                    sockets.push(read_socket(g.pid, g.fd, ino, &peers, &tree_sockets)?);
                    Some(ino)
                } else {
                    None
                };
                shared.push(SharedFile {
                    id,
                    kind: f.kind,
                    path: f.path.clone(),
                    flags: f.flags,
                    pos: f.pos,
                    pipe,
                    socket,
                });
            }
            f.shared = Some(id);
        }
    }
    debug!(
        shared = shared.len(),
        pipes = pipes.len(),
        sockets = sockets.len(),
        "open files across the tree"
    );
    Ok(Shares {
        files: shared,
        pipes,
        sockets,
    })
}

/// A pipe that a process outside the tree also holds cannot be restored
/// (its other side would be lost): refuse it, naming the outside holder.
fn refuse_outside_pipes(files: &[(Pid, FileState)]) -> Result<()> {
    let mut pipes: HashMap<String, (Pid, i32)> = HashMap::new();
    for (pid, state) in files {
        for f in state.fds.iter().filter(|f| f.kind == FdKind::Pipe) {
            pipes
                .entry(f.path.to_string_lossy().into_owned())
                .or_insert((*pid, f.fd));
        }
    }
    if pipes.is_empty() {
        return Ok(());
    }
    let me = std::process::id() as i32;
    let Ok(all) = fs::read_dir("/proc") else {
        return Ok(());
    };
    for e in all.flatten() {
        let Some(other) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if other == me || files.iter().any(|(p, _)| p.0 == other) {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{other}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = fs::read_link(fd.path()) else {
                continue;
            };
            if let Some((pid, n)) = pipes.get(target.to_string_lossy().as_ref()) {
                return Err(Error::Unsupported {
                    pid: *pid,
                    what: format!(
                        "fd {n}, {}, which pid {other} outside the dumped tree also holds",
                        target.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// What `share` found.
pub struct Shares {
    pub files: Vec<SharedFile>,
    pub pipes: Vec<PipeState>,
    pub sockets: Vec<SocketState>,
}

fn socket_ino(path: &std::path::Path) -> u64 {
    path.to_string_lossy()
        .trim_start_matches("socket:[")
        .trim_end_matches(']')
        .parse()
        .unwrap_or(0)
}

/// One end of a unix socket pair: its type, its peer (which must be in the
/// tree, or closed) and what is queued for it, read without taking it.
fn read_socket(
    pid: Pid,
    fd: i32,
    ino: u64,
    peers: &HashMap<u64, u64>,
    tree: &[u64],
) -> Result<SocketState> {
    let unsupported = |what: String| Error::Unsupported { pid, what };
    let sys_err = |call: &'static str| move |source| Error::Sys { call, pid, source };
    let local = sys::fd_of(pid, fd).map_err(sys_err("pidfd_getfd"))?;
    let (domain, kind) =
        sys::socket_kind(&local).map_err(sys_err("getsockopt(SO_DOMAIN/SO_TYPE)"))?;
    if domain != libc::AF_UNIX {
        return Err(unsupported(format!(
            "fd {fd}, a socket of address family {domain} (only unix socket pairs are)"
        )));
    }
    if sys::unix_socket_named(&local).map_err(sys_err("getsockname"))? {
        return Err(unsupported(format!(
            "fd {fd}, a bound unix socket (only unnamed socket pairs are)"
        )));
    }
    let peer = peers.get(&ino).copied().unwrap_or(0);
    if peer != 0 && !tree.contains(&peer) {
        return Err(unsupported(format!(
            "fd {fd}, a unix socket whose peer socket:[{peer}] is outside the dumped tree"
        )));
    }
    let queued = sys::peek_queue(&local)
        .map_err(sys_err("recv(MSG_PEEK)"))?
        .into_iter()
        .map(Message)
        .collect::<Vec<_>>();
    debug!(%pid, fd, ino, peer, kind, messages = queued.len(), "socket saved");
    Ok(SocketState {
        ino,
        peer,
        kind,
        queued,
    })
}

/// Reads what is buffered in the pipe behind `/proc/PID/fd/FD` without
/// taking it: a fresh read-only open of the pipe, `tee` into a pipe of our
/// own, and a read of that.
fn read_pipe(pid: Pid, fd: i32, ino: u64) -> Result<PipeState> {
    let link = format!("/proc/{pid}/fd/{fd}");
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&link)
        .map_err(|e| Error::proc(&link, e))?;
    let io = |call: &'static str| move |source| Error::Sys { call, pid, source };
    let capacity = sys::pipe_capacity(&file).map_err(io("fcntl(F_GETPIPE_SZ)"))?;
    let queued = sys::bytes_buffered(&file).map_err(io("ioctl(FIONREAD)"))?;
    let mut data = Vec::with_capacity(queued);
    if queued > 0 {
        let (r, w) = sys::pipe().map_err(io("pipe2"))?;
        sys::set_pipe_capacity(&w, capacity.max(queued as u32))
            .map_err(io("fcntl(F_SETPIPE_SZ)"))?;
        let n = sys::tee(&file, &w, queued).map_err(io("tee"))?;
        drop(w);
        File::from(r)
            .take(n as u64)
            .read_to_end(&mut data)
            .map_err(io("read(pipe copy)"))?;
    }
    debug!(%pid, fd, ino, capacity, bytes = data.len(), "pipe saved");
    Ok(PipeState {
        ino,
        capacity,
        data,
    })
}

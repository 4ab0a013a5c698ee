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
use crate::image::{FdKind, FileState, PipeState, SharedFile};
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
pub fn share(files: &mut [(Pid, FileState)]) -> Result<(Vec<SharedFile>, Vec<PipeState>)> {
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

    let mut shared = Vec::new();
    let mut pipes: Vec<PipeState> = Vec::new();
    let mut ids: HashMap<usize, u32> = HashMap::new();
    for (pid, state) in files.iter_mut() {
        for f in state.fds.iter_mut() {
            let Some(&gi) = of_fd.get(&(*pid, f.dup_of.unwrap_or(f.fd))) else {
                continue;
            };
            let g = &groups[gi];
            let across = g.holders.iter().any(|h| h != &g.pid);
            let pipe_like = matches!(f.kind, FdKind::Pipe | FdKind::Fifo);
            if !pipe_like && !across {
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
                shared.push(SharedFile {
                    id,
                    kind: f.kind,
                    path: f.path.clone(),
                    flags: f.flags,
                    pos: f.pos,
                    pipe,
                });
            }
            f.shared = Some(id);
        }
    }
    debug!(
        shared = shared.len(),
        pipes = pipes.len(),
        "open files across the tree"
    );
    Ok((shared, pipes))
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

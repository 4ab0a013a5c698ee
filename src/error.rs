//! The library's error type: one variant per kind of failing operation, each
//! carrying what it failed on (pid, syscall, path, image file). The cause is
//! kept as `#[source]` and printed once, at the top.

use std::io;
use std::path::PathBuf;

use crate::sys::Pid;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no process with pid {0}")]
    NoSuchProcess(Pid),

    #[error("ptrace({request}) on pid {pid}")]
    Ptrace {
        request: &'static str,
        pid: Pid,
        #[source]
        source: io::Error,
    },

    #[error("{call} for pid {pid}")]
    Sys {
        call: &'static str,
        pid: Pid,
        #[source]
        source: io::Error,
    },

    #[error("{call}")]
    Local {
        call: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("{syscall} inside pid {pid} ({detail})")]
    Remote {
        syscall: &'static str,
        pid: Pid,
        detail: String,
        #[source]
        source: io::Error,
    },

    #[error("pid {pid} stopped unexpectedly while {doing} (wait status {status:#x})")]
    UnexpectedStop {
        pid: Pid,
        doing: &'static str,
        status: i32,
    },

    #[error("reading {path}")]
    Proc {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("parsing {path}: {problem}")]
    ProcFormat { path: PathBuf, problem: String },

    #[error("pid {pid}: {what} is not supported")]
    Unsupported { pid: Pid, what: String },

    #[error("image file {path}: {problem}")]
    Image { path: PathBuf, problem: String },

    #[error("image file {path}")]
    ImageIo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("writing pid file {path}")]
    PidFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("interrupted; the tree was let go as it was and no image was written")]
    Interrupted,

    #[error("pid {0} is in use; restore needs the dumped pid free")]
    PidInUse(Pid),

    #[error("dumping pid {pid}: {problem}")]
    Dump { pid: Pid, problem: String },

    #[error("restoring pid {pid}: {problem}")]
    Restore { pid: Pid, problem: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// `waitpid(pid, __WALL)` with the failure named: the wait status.
pub fn wait(pid: Pid) -> Result<i32> {
    crate::sys::waitpid(pid, 0).map_err(|source| Error::Sys {
        call: "waitpid",
        pid,
        source,
    })
}

impl Error {
    pub fn proc(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Proc {
            path: path.into(),
            source,
        }
    }

    pub fn image(path: impl Into<PathBuf>, problem: impl Into<String>) -> Error {
        Error::Image {
            path: path.into(),
            problem: problem.into(),
        }
    }

    pub fn image_io(path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::ImageIo {
            path: path.into(),
            source,
        }
    }
}

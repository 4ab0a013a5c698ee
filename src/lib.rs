//! cryopod: checkpoint/restore of Linux processes, native x86_64 and ia32.
//!
//! Layout: `sys` (raw syscalls, all the unsafe code), `proc` (reading
//! /proc), `arch` (task widths and registers), `inject` (syscalls run inside
//! a tracee), `image` (the on-disk format), `dump`, `restore`, `check`.

#![deny(unsafe_code)]

pub mod arch;
pub mod check;
pub mod dump;
pub mod error;
pub mod image;
pub mod inject;
pub mod ldt;
pub mod proc;
pub mod restore;
pub mod sys;

pub use error::{Error, Result};

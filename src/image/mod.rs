//! The image directory and its file format.
//!
//! Metadata files (`inventory.img`, `task-PID.img`) are a 32-byte header
//! followed by a JSON payload:
//!
//! | offset | size | field                               |
//! |--------|------|-------------------------------------|
//! | 0      | 8    | magic `CRYOPOD\n`                   |
//! | 8      | 4    | format version (LE)                 |
//! | 12     | 4    | file kind (LE): 1 inventory, 2 task |
//! | 16     | 8    | payload length (LE)                 |
//! | 24     | 4    | CRC-32 of the payload (LE)          |
//! | 28     | 4    | zero                                |
//!
//! Page data (`pages-PID.img`) is raw: one 4096-byte header page (magic
//! `CRYOPAGE`, version, pid, page count), then the pages, each at a
//! page-aligned offset so that restore can map or read them straight into
//! place; its CRC-32 is kept in the task image and checked before restore. Every file is written as `NAME.part` and renamed when the whole
//! image is complete; the inventory goes last.

pub mod types;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};
use crate::sys::Pid;
pub use types::*;

pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"CRYOPOD\n";
const PAGES_MAGIC: &[u8; 8] = b"CRYOPAGE";
const HEADER_LEN: usize = 32;
pub const PAGE_SIZE: u64 = 4096;
/// Largest metadata payload accepted: far above any real task, low enough
/// that a corrupt length cannot make us allocate the machine away.
const MAX_PAYLOAD: u64 = 256 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Inventory = 1,
    Task = 2,
}

pub fn inventory_path(dir: &Path) -> PathBuf {
    dir.join("inventory.img")
}

pub fn task_path(dir: &Path, pid: Pid) -> PathBuf {
    dir.join(format!("task-{pid}.img"))
}

pub fn pages_path(dir: &Path, pid: Pid) -> PathBuf {
    dir.join(format!("pages-{pid}.img"))
}

fn encode<T: Serialize>(kind: Kind, value: &T) -> Vec<u8> {
    // Serializing plain data structs to a Vec cannot fail.
    let payload = serde_json::to_vec(value).unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(kind as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

fn decode<T: DeserializeOwned>(path: &Path, kind: Kind, bytes: &[u8]) -> Result<T> {
    let bad = |problem: String| Error::image(path, problem);
    if bytes.len() < HEADER_LEN {
        return Err(bad(format!(
            "truncated: {} bytes, header needs {HEADER_LEN}",
            bytes.len()
        )));
    }
    if &bytes[..8] != MAGIC {
        return Err(bad("not a cryopod image (bad magic)".into()));
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {version}, this cryopod reads version {FORMAT_VERSION}"
        )));
    }
    if word(12) != kind as u32 {
        return Err(bad(format!(
            "file kind {} where {:?} was expected",
            word(12),
            kind
        )));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len8);
    let payload = &bytes[HEADER_LEN..];
    if len > MAX_PAYLOAD || payload.len() as u64 != len {
        return Err(bad(format!(
            "truncated or padded: header says {len} payload bytes, file has {}",
            payload.len()
        )));
    }
    let crc = crc32fast::hash(payload);
    if crc != word(24) {
        return Err(bad(format!(
            "checksum mismatch (stored {:#010x}, computed {crc:#010x})",
            word(24)
        )));
    }
    serde_json::from_slice(payload).map_err(|e| bad(format!("malformed payload: {e}")))
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    let mut f = File::open(path).map_err(|e| Error::image_io(path, e))?;
    let size = f.metadata().map_err(|e| Error::image_io(path, e))?.len();
    if size > MAX_PAYLOAD + HEADER_LEN as u64 {
        return Err(Error::image(
            path,
            format!("{size} bytes is too large for a metadata file"),
        ));
    }
    let mut buf = Vec::with_capacity(size as usize);
    f.read_to_end(&mut buf)
        .map_err(|e| Error::image_io(path, e))?;
    Ok(buf)
}

pub fn read_inventory(dir: &Path) -> Result<Inventory> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::image(
            dir,
            "not a directory (an image is a directory)",
        ));
    }
    if !dir.is_dir() {
        return Err(Error::image(dir, "no such image directory"));
    }
    let path = inventory_path(dir);
    decode(&path, Kind::Inventory, &read_file(&path)?)
}

pub fn read_task(dir: &Path, pid: Pid) -> Result<TaskImage> {
    let path = task_path(dir, pid);
    let task: TaskImage = decode(&path, Kind::Task, &read_file(&path)?)?;
    if task.pid != pid {
        return Err(Error::image(
            &path,
            format!("holds pid {}, not {pid}", task.pid),
        ));
    }
    validate_task(&path, &task)?;
    Ok(task)
}

/// Consistency checks that make restore's later steps safe to attempt.
fn validate_task(path: &Path, task: &TaskImage) -> Result<()> {
    let bad = |p: String| Error::image(path, p);
    let mut prev_end = 0u64;
    for v in &task.vmas {
        if v.start % PAGE_SIZE != 0
            || v.end % PAGE_SIZE != 0
            || v.end <= v.start
            || v.start < prev_end
        {
            return Err(bad(format!(
                "mapping {:#x}-{:#x} is not page-aligned, empty or out of order",
                v.start, v.end
            )));
        }
        prev_end = v.end;
    }
    for run in &task.pages {
        let end = run.addr + run.pages * PAGE_SIZE;
        let inside = task
            .vmas
            .iter()
            .any(|v| v.is_restored() && v.start <= run.addr && end <= v.end);
        if !inside || run.first + run.pages > task.page_count {
            return Err(bad(format!(
                "page run at {:#x} ({} pages) lies outside the saved mappings or pages file",
                run.addr, run.pages
            )));
        }
    }
    if task.main_thread().map(|t| t.tid) != Some(task.pid) {
        return Err(bad("the first thread is not the main thread".into()));
    }
    for t in &task.threads {
        if t.xstate.len() < 512 {
            return Err(bad(format!(
                "thread {}: xstate of {} bytes is shorter than the FXSAVE area",
                t.tid,
                t.xstate.len()
            )));
        }
    }
    Ok(())
}

/// Opens a pages file and checks its header against what the task expects.
pub fn open_pages(dir: &Path, task: &TaskImage) -> Result<File> {
    let path = pages_path(dir, task.pid);
    let mut f = File::open(&path).map_err(|e| Error::image_io(&path, e))?;
    let mut head = [0u8; 24];
    f.read_exact(&mut head).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::image(&path, "truncated: no complete header"),
        _ => Error::image_io(&path, e),
    })?;
    if &head[..8] != PAGES_MAGIC {
        return Err(Error::image(&path, "not a cryopod pages file (bad magic)"));
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if version != FORMAT_VERSION {
        return Err(Error::image(
            &path,
            format!("format version {version}, expected {FORMAT_VERSION}"),
        ));
    }
    let mut count8 = [0u8; 8];
    count8.copy_from_slice(&head[16..24]);
    let count = u64::from_le_bytes(count8);
    let size = f.metadata().map_err(|e| Error::image_io(&path, e))?.len();
    let want = PAGE_SIZE * (1 + task.page_count);
    if count != task.page_count || size != want {
        return Err(Error::image(
            &path,
            format!(
                "holds {size} bytes ({count} pages in header), task image expects {want} bytes"
            ),
        ));
    }
    // Page data is checked like metadata, before anything is made: a flipped
    // byte would otherwise be restored silently into the process.
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut at = PAGE_SIZE;
    while at < size {
        let n = buf.len().min((size - at) as usize);
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf[..n], at)
            .map_err(|e| Error::image_io(&path, e))?;
        crc.update(&buf[..n]);
        at += n as u64;
    }
    let computed = crc.finalize();
    if computed != task.pages_crc {
        return Err(Error::image(
            &path,
            format!(
                "page data checksum mismatch (stored {:#010x}, computed {computed:#010x})",
                task.pages_crc
            ),
        ));
    }
    Ok(f)
}

/// The header page of a pages file.
pub fn pages_header(pid: Pid, count: u64) -> [u8; PAGE_SIZE as usize] {
    let mut page = [0u8; PAGE_SIZE as usize];
    page[..8].copy_from_slice(PAGES_MAGIC);
    page[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    page[12..16].copy_from_slice(&pid.0.to_le_bytes());
    page[16..24].copy_from_slice(&count.to_le_bytes());
    page
}

/// Writes an image's files as `NAME.part` and renames them into place only
/// when `commit` is called; dropped uncommitted, it removes what it wrote.
pub struct ImageWriter {
    dir: PathBuf,
    parts: Vec<PathBuf>,
    committed: bool,
    /// The directory did not exist before: a failed dump removes it again.
    created: bool,
}

impl ImageWriter {
    pub fn new(dir: &Path) -> Result<ImageWriter> {
        let created = !dir.exists();
        fs::create_dir_all(dir).map_err(|e| Error::image_io(dir, e))?;
        Ok(ImageWriter {
            dir: dir.to_path_buf(),
            parts: Vec::new(),
            committed: false,
            created,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates `final_path.part` for writing.
    pub fn create(&mut self, final_path: &Path) -> Result<File> {
        let part = part_path(final_path);
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&part)
            .map_err(|e| Error::image_io(&part, e))?;
        self.parts.push(final_path.to_path_buf());
        Ok(f)
    }

    pub fn write_task(&mut self, task: &TaskImage) -> Result<()> {
        let path = task_path(&self.dir, task.pid);
        self.write_meta(&path, &encode(Kind::Task, task))
    }

    fn write_meta(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        let mut f = self.create(path)?;
        f.write_all(bytes).map_err(|e| Error::image_io(path, e))
    }

    /// Writes the inventory and renames every file into place.
    pub fn commit(mut self, inventory: &Inventory) -> Result<()> {
        // Stale files of an earlier dump into the same directory must not
        // mix with this one.
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                let ours = name == "inventory.img"
                    || ((name.starts_with("task-") || name.starts_with("pages-"))
                        && name.ends_with(".img"));
                if ours
                    && !self
                        .parts
                        .iter()
                        .any(|p| p.file_name() == Some(e.file_name().as_os_str()))
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let inv = inventory_path(&self.dir);
        self.write_meta(&inv, &encode(Kind::Inventory, inventory))?;
        // Inventory last: an image without one is incomplete.
        let mut order: Vec<PathBuf> = self.parts.iter().filter(|p| **p != inv).cloned().collect();
        order.push(inv);
        for p in &order {
            fs::rename(part_path(p), p).map_err(|e| Error::image_io(p, e))?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if !self.committed {
            for p in &self.parts {
                let _ = fs::remove_file(part_path(p));
            }
            if self.created {
                let _ = fs::remove_dir(&self.dir);
            }
        }
    }
}

fn part_path(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".part");
    PathBuf::from(s)
}

/// The whole image as one JSON value, for `cryopod show`.
pub fn show(dir: &Path) -> Result<serde_json::Value> {
    let inv = read_inventory(dir)?;
    let mut tasks = Vec::new();
    for pid in &inv.tasks {
        tasks.push(read_task(dir, *pid)?);
    }
    Ok(serde_json::json!({
        "format_version": FORMAT_VERSION,
        "inventory": inv,
        "tasks": tasks,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv() -> Inventory {
        Inventory {
            tool_version: "t".into(),
            kernel_release: "k".into(),
            root_pid: Pid(7),
            tasks: vec![Pid(7)],
            zombies: Vec::new(),
            files: Vec::new(),
            pipes: Vec::new(),
            sockets: Vec::new(),
            dumped_at: 1,
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(Kind::Inventory, &inv());
        let back: Inventory = decode(Path::new("x"), Kind::Inventory, &bytes).unwrap();
        assert_eq!(back.root_pid, Pid(7));
    }

    #[test]
    fn corruption_is_named() {
        let mut bytes = encode(Kind::Inventory, &inv());
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        let e = decode::<Inventory>(Path::new("dir/inventory.img"), Kind::Inventory, &bytes)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("dir/inventory.img: checksum mismatch"),
            "{e}"
        );
    }

    #[test]
    fn truncation_version_and_kind_are_refused() {
        let bytes = encode(Kind::Inventory, &inv());
        let e = decode::<Inventory>(Path::new("f"), Kind::Inventory, &bytes[..bytes.len() - 1])
            .unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = decode::<Inventory>(Path::new("f"), Kind::Inventory, &bytes[..10]).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let mut v2 = bytes.clone();
        v2[8] = 9;
        let e = decode::<Inventory>(Path::new("f"), Kind::Inventory, &v2).unwrap_err();
        assert!(e.to_string().contains("format version 9"), "{e}");
        let e = decode::<Inventory>(Path::new("f"), Kind::Task, &bytes).unwrap_err();
        assert!(e.to_string().contains("file kind 1"), "{e}");
        let e = decode::<Inventory>(
            Path::new("f"),
            Kind::Inventory,
            b"#!/bin/sh\nexit 0\n\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        )
        .unwrap_err();
        assert!(e.to_string().contains("bad magic"), "{e}");
    }
}

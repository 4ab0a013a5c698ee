//! Saving a frozen task's memory: which pages to keep (from pagemap), and
//! copying them into the pages file through a small staging buffer
//! (`process_vm_readv` then `pwrite`); areas the task may not read
//! (PROT_NONE) go through /proc/PID/mem, which may.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use tracing::debug;

use crate::error::{Error, Result};
use crate::image::{self, ImageWriter, PAGE_SIZE, PageRun, Vma, VmaKind};
use crate::proc::{PM_FILE, PM_PRESENT, PM_SWAP, Pagemap};
use crate::sys::{self, Pid, Transfer};

/// Pagemap entries read per call: 1 GiB of address space.
const PAGEMAP_CHUNK: u64 = 1 << 18;

/// Whether a page of `vma` with pagemap entry `pm` holds data that only the
/// image can give back.
fn page_is_saved(vma: &Vma, pm: u64) -> bool {
    match vma.kind {
        // Shared file pages live in the file; not saved.
        VmaKind::File { .. } if vma.shared => false,
        // Private file pages: only those the task wrote (anonymous copies).
        VmaKind::File { .. } => pm & PM_SWAP != 0 || (pm & PM_PRESENT != 0 && pm & PM_FILE == 0),
        // Anonymous (private or shared): every page that exists. Pages never
        // touched are neither present nor swapped and are left out.
        // A shared page is saved by every process that has it mapped, and
        // restore writes each process's pages into the one object, so the
        // object gets the union. Shortcoming: a page of the object that no
        // process had mapped when frozen is not seen and comes back zero.
        VmaKind::Anon | VmaKind::SharedAnon { .. } => pm & (PM_PRESENT | PM_SWAP) != 0,
        VmaKind::Vdso { .. } | VmaKind::Vsyscall => false,
    }
}

/// Finds the runs of pages to save, in address order.
pub fn plan(pid: Pid, vmas: &[Vma]) -> Result<(Vec<PageRun>, u64)> {
    let pagemap = Pagemap::open(pid)?;
    let mut runs: Vec<PageRun> = Vec::new();
    let mut total = 0u64;
    for vma in vmas.iter().filter(|v| v.is_restored()) {
        if matches!(vma.kind, VmaKind::File { .. }) && vma.shared || vma.resident == 0 {
            continue;
        }
        let mut at = vma.start;
        while at < vma.end {
            let end = vma.end.min(at + PAGEMAP_CHUNK * PAGE_SIZE);
            for (i, pm) in pagemap.read(at, end)?.into_iter().enumerate() {
                if !page_is_saved(vma, pm) {
                    continue;
                }
                let addr = at + i as u64 * PAGE_SIZE;
                match runs.last_mut() {
                    Some(r) if r.addr + r.pages * PAGE_SIZE == addr && addr != vma.start => {
                        r.pages += 1
                    }
                    _ => runs.push(PageRun {
                        addr,
                        pages: 1,
                        first: total,
                    }),
                }
                total += 1;
            }
            at = end;
        }
    }
    Ok((runs, total))
}

/// Bytes staged between the task and the pages file. Small enough to stay
/// in cache, large enough that each `process_vm_readv` and `pwrite` moves
/// a lot at once.
const STAGE: usize = 4 << 20;

/// Writes the pages file for `runs`.
///
/// Pages go task -> staging buffer (`process_vm_readv`) -> page cache
/// (`pwrite`). Writing whole pages with `pwrite` lets the kernel skip the
/// zero-fill that a store through a fresh shared file mapping costs, which
/// measured slower than this second copy (see bench/README.md).
pub fn write_pages(
    pid: Pid,
    vmas: &[Vma],
    runs: &[PageRun],
    total: u64,
    writer: &mut ImageWriter,
) -> Result<u32> {
    let path = image::pages_path(writer.dir(), pid);
    let file = writer.create(&path)?;
    let io_err = |e| Error::image_io(&path, e);
    file.write_all_at(&image::pages_header(pid, total), 0)
        .map_err(io_err)?;
    let readable = |addr: u64| {
        vmas.iter()
            .find(|v| v.start <= addr && addr < v.end)
            .is_some_and(|v| v.prot.read)
    };
    let bar = progress(total * PAGE_SIZE);
    let mut stage = Stage {
        pid,
        file: &file,
        path: &path,
        buf: vec![
            1u8;
            STAGE
                .min((total * PAGE_SIZE) as usize)
                .max(PAGE_SIZE as usize)
        ],
        pieces: Vec::new(),
        filled: 0,
        file_off: PAGE_SIZE,
        crc: crc32fast::Hasher::new(),
    };
    let mut mem: Option<File> = None;
    let mem_path = format!("/proc/{pid}/mem");
    for run in runs {
        debug_assert_eq!(
            stage.file_off + stage.filled as u64,
            (1 + run.first) * PAGE_SIZE
        );
        let mut addr = run.addr;
        let mut left = (run.pages * PAGE_SIZE) as usize;
        let through_mem = !readable(run.addr);
        while left > 0 {
            if stage.filled == stage.buf.len() || (through_mem && stage.filled > 0) {
                bar.inc(stage.flush()? as u64);
            }
            let n = left.min(stage.buf.len() - stage.filled);
            if through_mem {
                // PROT_NONE and other unreadable areas: /proc/PID/mem may
                // read what process_vm_readv may not.
                if mem.is_none() {
                    mem = Some(File::open(&mem_path).map_err(|e| Error::proc(&mem_path, e))?);
                }
                if let Some(mem) = &mem {
                    mem.read_exact_at(&mut stage.buf[..n], addr)
                        .map_err(|e| Error::proc(&mem_path, e))?;
                }
                file.write_all_at(&stage.buf[..n], stage.file_off)
                    .map_err(io_err)?;
                stage.crc.update(&stage.buf[..n]);
                stage.file_off += n as u64;
                bar.inc(n as u64);
            } else {
                stage.add(addr, n);
            }
            addr += n as u64;
            left -= n;
        }
    }
    bar.inc(stage.flush()? as u64);
    bar.finish_and_clear();
    debug!(%pid, pages = total, runs = runs.len(), "pages written");
    Ok(stage.crc.finalize())
}

/// The staging buffer and the pieces of task memory waiting to fill it.
/// The buffer holds one contiguous range of the pages file from `file_off`.
struct Stage<'a> {
    pid: Pid,
    file: &'a File,
    path: &'a Path,
    buf: Vec<u8>,
    pieces: Vec<Transfer>,
    filled: usize,
    file_off: u64,
    /// CRC-32 of everything written after the header, in file order.
    crc: crc32fast::Hasher,
}

impl Stage<'_> {
    fn add(&mut self, remote: u64, len: usize) {
        self.pieces.push(Transfer {
            remote,
            local: self.buf.as_mut_ptr().wrapping_add(self.filled),
            len,
        });
        self.filled += len;
    }

    /// Reads the pending pieces into the buffer and writes it out.
    fn flush(&mut self) -> Result<usize> {
        super::check_interrupt()?;
        if self.filled == 0 {
            return Ok(0);
        }
        copy_batch(self.pid, &self.pieces, self.filled)?;
        self.crc.update(&self.buf[..self.filled]);
        self.file
            .write_all_at(&self.buf[..self.filled], self.file_off)
            .map_err(|e| Error::image_io(self.path, e))?;
        let n = self.filled;
        self.file_off += n as u64;
        self.filled = 0;
        self.pieces.clear();
        Ok(n)
    }
}

fn copy_batch(pid: Pid, batch: &[Transfer], bytes: usize) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let n = read_into(pid, batch)?;
    if n != bytes {
        let first = batch.first().map(|t| t.remote).unwrap_or(0);
        return Err(Error::Dump {
            pid,
            problem: format!("process_vm_readv read {n} of {bytes} bytes (batch from {first:#x})"),
        });
    }
    Ok(())
}

#[allow(unsafe_code)]
fn read_into(pid: Pid, batch: &[Transfer]) -> Result<usize> {
    // SAFETY: every Transfer.local points into Stage::buf at an offset and
    // length inside it (Stage::add), and the buffer is neither moved nor
    // resized while the pieces exist.
    unsafe { sys::process_vm(pid, batch, false) }.map_err(|source| Error::Sys {
        call: "process_vm_readv",
        pid,
        source,
    })
}

pub fn progress(bytes: u64) -> ProgressBar {
    if !sys::stderr_is_tty() || bytes < (256 << 20) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(bytes);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec}")
    {
        bar.set_style(style);
    }
    bar
}

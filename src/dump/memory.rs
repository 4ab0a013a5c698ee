//! Saving a frozen task's memory: which pages to keep (from pagemap), and
//! copying them into the pages file with one copy each. The pages file is
//! mapped shared and `process_vm_readv` reads the task's pages straight into
//! its page cache; areas the task may not read (PROT_NONE) go through
//! /proc/PID/mem, which may.

use std::fs::File;
use std::os::unix::fs::FileExt;

use indicatif::{ProgressBar, ProgressStyle};
use tracing::debug;

use crate::error::{Error, Result};
use crate::image::{self, ImageWriter, PAGE_SIZE, PageRun, Vma, VmaKind};
use crate::proc::{PM_FILE, PM_PRESENT, PM_SWAP, Pagemap};
use crate::sys::{self, FileMap, Pid, Transfer};

/// Pagemap entries read per call: 1 GiB of address space.
const PAGEMAP_CHUNK: u64 = 1 << 18;
/// Bytes copied between progress updates.
const COPY_CHUNK: usize = 64 << 20;

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
        // Shortcoming: a shared anonymous page that another process touched
        // but this one never mapped is not seen here; trees (where that can
        // happen) should read such objects through /proc/PID/map_files.
        VmaKind::Anon | VmaKind::SharedAnon => pm & (PM_PRESENT | PM_SWAP) != 0,
        VmaKind::Vdso { .. } | VmaKind::Vsyscall => false,
    }
}

/// Finds the runs of pages to save, in address order.
pub fn plan(pid: Pid, vmas: &[Vma]) -> Result<(Vec<PageRun>, u64)> {
    let pagemap = Pagemap::open(pid)?;
    let mut runs: Vec<PageRun> = Vec::new();
    let mut total = 0u64;
    for vma in vmas.iter().filter(|v| v.is_restored()) {
        if matches!(vma.kind, VmaKind::File { .. }) && vma.shared {
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

/// Writes the pages file for `runs`.
pub fn write_pages(
    pid: Pid,
    vmas: &[Vma],
    runs: &[PageRun],
    total: u64,
    writer: &mut ImageWriter,
) -> Result<()> {
    let path = image::pages_path(writer.dir(), pid);
    let file = writer.create(&path)?;
    let io_err = |e| Error::image_io(&path, e);
    file.write_all_at(&image::pages_header(pid, total), 0)
        .map_err(io_err)?;
    file.set_len(PAGE_SIZE * (1 + total)).map_err(io_err)?;
    if total == 0 {
        return Ok(());
    }
    let map = FileMap::new(&file, (PAGE_SIZE * (1 + total)) as usize, true).map_err(io_err)?;
    let readable = |addr: u64| {
        vmas.iter()
            .find(|v| v.start <= addr && addr < v.end)
            .is_some_and(|v| v.prot.read)
    };
    let bar = progress(total * PAGE_SIZE);
    let mut batch: Vec<Transfer> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut unreadable = Vec::new();
    for run in runs {
        let len = (run.pages * PAGE_SIZE) as usize;
        let offset = ((1 + run.first) * PAGE_SIZE) as usize;
        if !readable(run.addr) {
            unreadable.push((run, offset, len));
            continue;
        }
        // The mapping covers the whole file; offset + len is inside it.
        let local = map.ptr().wrapping_add(offset);
        batch.push(Transfer {
            remote: run.addr,
            local,
            len,
        });
        batch_bytes += len;
        if batch_bytes >= COPY_CHUNK {
            copy_batch(pid, &batch, batch_bytes)?;
            bar.inc(batch_bytes as u64);
            batch.clear();
            batch_bytes = 0;
        }
    }
    copy_batch(pid, &batch, batch_bytes)?;
    bar.inc(batch_bytes as u64);
    if !unreadable.is_empty() {
        let mem_path = format!("/proc/{pid}/mem");
        let mem = File::open(&mem_path).map_err(|e| Error::proc(&mem_path, e))?;
        for (run, offset, len) in unreadable {
            let mut buf = vec![0u8; len];
            mem.read_exact_at(&mut buf, run.addr)
                .map_err(|e| Error::proc(&mem_path, e))?;
            file.write_all_at(&buf, offset as u64).map_err(io_err)?;
            bar.inc(len as u64);
        }
    }
    bar.finish_and_clear();
    debug!(%pid, pages = total, runs = runs.len(), "pages written");
    Ok(())
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
    // SAFETY: every Transfer.local points into a writable shared mapping of
    // the pages file that outlives this call, with len inside the mapping.
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

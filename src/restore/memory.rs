//! Rebuilding the address space: parking, clearing the stub, the vDSO,
//! every mapping at its address, page contents, final protections.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;

use tracing::debug;

use crate::arch::{Abi, nr};
use crate::dump::memory::progress;
use crate::error::{Error, Result};
use crate::image::{PAGE_SIZE, PageRun, TaskImage, Vma, VmaKind};
use crate::sys::{self, FileMap, Pid, Transfer};

use super::{Builder, PARK_LEN, stub};

const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
const ARCH_MAP_VDSO_32: u64 = 0x2002;
const ARCH_MAP_VDSO_64: u64 = 0x2003;

/// Current mappings of a task as (start, end, name) triples.
fn current_ranges(pid: Pid) -> Result<Vec<(u64, u64, String)>> {
    let path = format!("/proc/{pid}/maps");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::proc(&path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let (range, rest) = l.split_once(' ')?;
            let (a, b) = range.split_once('-')?;
            let name = rest.split_whitespace().nth(4).unwrap_or("").to_string();
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
                name,
            ))
        })
        .collect())
}

/// A hole below 4 GiB that no dumped process of the tree uses, nor the root
/// stub (`pid`), nor any stub's image: one address for the whole tree, so
/// a child forked after its parent's memory is built finds the parking
/// page where it expects it.
pub fn parking_address(tasks: &[&TaskImage], pid: Pid) -> Result<u64> {
    let mut used: Vec<(u64, u64)> = tasks
        .iter()
        .flat_map(|t| t.vmas.iter().map(|v| (v.start, v.end)))
        .collect();
    used.extend(current_ranges(pid)?.into_iter().map(|(a, b, _)| (a, b)));
    used.push((stub::BASE_64, stub::BASE_64 + PAGE_SIZE));
    used.push((stub::BASE_32, stub::BASE_32 + PAGE_SIZE));
    crate::proc::find_hole(&mut used, PARK_LEN).ok_or_else(|| Error::Restore {
        pid,
        problem: format!("no free {PARK_LEN:#x} bytes below 4 GiB for the restorer's parking page"),
    })
}

/// Builds the memory of a freshly exec'd stub from the image: removes the
/// stub's own mappings, places the vDSO, makes and fills every mapping and
/// sets protections.
pub fn build_fresh(b: &Builder, pages: &File, shmem: &mut Shmem) -> Result<()> {
    clear_stub(b)?;
    map_vdso(b)?;
    let made = map_all(b, shmem)?;
    fill_pages(b, pages, &made, &b.task.pages)?;
    protect(b, &made)
}

/// Maps the parking area and moves the injection code there.
pub fn park(b: &mut Builder) -> Result<()> {
    let prot = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64 | MAP_FIXED_NOREPLACE;
    let got = b.inj.call(
        "mmap",
        nr::x86_64::MMAP,
        [b.park, PARK_LEN, prot, flags, u64::MAX, 0],
        || format!("parking area at {:#x}", b.park),
    )?;
    if got != b.park {
        return Err(Error::Restore {
            pid: b.pid,
            problem: format!("parking area landed at {got:#x}, not {:#x}", b.park),
        });
    }
    sys::write_remote(b.pid, b.park, &stub::CODE).map_err(|source| Error::Sys {
        call: "process_vm_writev(parking code)",
        pid: b.pid,
        source,
    })?;
    b.inj
        .set_code(b.park + stub::SYSCALL_OFF, Some(b.park + stub::INT80_OFF));
    debug!(pid = %b.pid, park = format!("{:#x}", b.park), "parked");
    Ok(())
}

/// Unmaps everything the stub's exec made (its image, stack, vDSO), but the
/// `[vsyscall]` page, which cannot be unmapped and which the dumped task had
/// too if it is 64-bit.
pub fn clear_stub(b: &Builder) -> Result<()> {
    for (start, end, name) in current_ranges(b.pid)? {
        if start == b.park || name == "[vsyscall]" {
            continue;
        }
        b.inj.call(
            "munmap",
            nr::x86_64::MUNMAP,
            [start, end - start, 0, 0, 0, 0],
            || format!("stub mapping {start:#x}-{end:#x} {name}"),
        )?;
    }
    Ok(())
}

/// Maps a fresh vDSO of the task's width where the dumped one was.
pub fn map_vdso(b: &Builder) -> Result<()> {
    let vdso: Vec<&Vma> = b
        .task
        .vmas
        .iter()
        .filter(|v| matches!(v.kind, VmaKind::Vdso { .. }))
        .collect();
    let Some(first) = vdso.first() else {
        return Ok(());
    };
    let op = match b.task.abi {
        Abi::X86_64 => ARCH_MAP_VDSO_64,
        Abi::Ia32 => ARCH_MAP_VDSO_32,
    };
    b.inj.call(
        "arch_prctl(ARCH_MAP_VDSO)",
        nr::x86_64::ARCH_PRCTL,
        [op, first.start, 0, 0, 0, 0],
        || format!("vDSO at {:#x}", first.start),
    )?;
    let now: Vec<(u64, u64, String)> = current_ranges(b.pid)?
        .into_iter()
        .filter(|(_, _, n)| n.starts_with("[vdso") || n.starts_with("[vvar"))
        .collect();
    for v in &vdso {
        let VmaKind::Vdso { name } = &v.kind else {
            continue;
        };
        if !now
            .iter()
            .any(|(s, e, n)| *s == v.start && *e == v.end && n == name)
        {
            return Err(Error::Restore {
                pid: b.pid,
                problem: format!(
                    "this kernel's vDSO layout differs from the image's ({name} at {:#x}-{:#x}; now {now:x?})",
                    v.start, v.end
                ),
            });
        }
    }
    Ok(())
}

/// A mapping as made, before its final protection is set.
pub struct Made {
    start: u64,
    len: u64,
    now: u64,
    want: u64,
}

/// Makes every mapping of the image at its address. Private mappings are
/// made writable for the page copy; `protect` sets the real protection.
pub fn map_all(b: &Builder, shmem: &mut Shmem) -> Result<Vec<Made>> {
    let mut fds: HashMap<(PathBuf, bool), u64> = HashMap::new();
    let mut made = Vec::new();
    let result = (|| {
        for v in b.task.vmas.iter().filter(|v| v.is_restored()) {
            made.push(map_one(b, v, &mut fds, shmem)?);
        }
        Ok(())
    })();
    for fd in fds.into_values() {
        b.close(fd)?;
    }
    result.map(|()| made)
}

/// Shared anonymous objects already made, by their dumped inode: the
/// process and range that map one, so others can map the same object
/// through /proc/PID/map_files.
pub type Shmem = HashMap<u64, (Pid, u64, u64)>;

fn map_one(
    b: &Builder,
    v: &Vma,
    fds: &mut HashMap<(PathBuf, bool), u64>,
    shmem: &mut Shmem,
) -> Result<Made> {
    let want = v.prot.bits();
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let mut flags = MAP_FIXED_NOREPLACE;
    if v.growsdown {
        flags |= libc::MAP_GROWSDOWN as u64;
    }
    if v.flags.noreserve {
        flags |= libc::MAP_NORESERVE as u64;
    }
    // A private mapping that was never writable is made with its own
    // protection (its pages go in through /proc/PID/mem), so it does not
    // gain the "accounted" flag and merge with a neighbour it was apart from.
    let private = if v.flags.account || v.prot.write {
        want | rw
    } else {
        want
    };
    let (now, fd, offset) = match &v.kind {
        VmaKind::Anon => {
            flags |= (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
            (private, u64::MAX, 0)
        }
        VmaKind::SharedAnon { inode, offset } => match shmem.get(inode) {
            Some((src, start, end)) => {
                // The same object another process (or mapping) has: map it
                // through that mapping's map_files link. Closed below.
                let link = PathBuf::from(format!("/proc/{src}/map_files/{start:x}-{end:x}"));
                let fd = b.open(&link, (libc::O_RDWR | libc::O_CLOEXEC) as u32)?;
                fds.insert((link, true), fd);
                flags |= libc::MAP_SHARED as u64;
                (want | rw, fd, *offset)
            }
            None => {
                shmem.insert(*inode, (b.pid, v.start, v.end));
                flags |= (libc::MAP_SHARED | libc::MAP_ANONYMOUS) as u64;
                (want | rw, u64::MAX, 0)
            }
        },
        VmaKind::File { path, offset, .. } => {
            let writable_shared = v.shared && v.prot.write;
            let fd = match fds.get(&(path.clone(), writable_shared)) {
                Some(fd) => *fd,
                None => {
                    let mode = if writable_shared {
                        libc::O_RDWR
                    } else {
                        libc::O_RDONLY
                    };
                    let fd = b.open(path, (mode | libc::O_CLOEXEC) as u32)?;
                    fds.insert((path.clone(), writable_shared), fd);
                    fd
                }
            };
            if v.shared {
                flags |= libc::MAP_SHARED as u64;
                (want, fd, *offset)
            } else {
                flags |= libc::MAP_PRIVATE as u64;
                (private, fd, *offset)
            }
        }
        VmaKind::Vdso { .. } | VmaKind::Vsyscall => unreachable!("filtered by is_restored"),
    };
    let got = b.inj.call(
        "mmap",
        nr::x86_64::MMAP,
        [v.start, v.len(), now, flags, fd, offset],
        || format!("{:#x}-{:#x} {:?}", v.start, v.end, v.kind),
    )?;
    if got != v.start {
        return Err(Error::Restore {
            pid: b.pid,
            problem: format!("mapping for {:#x} landed at {got:#x}", v.start),
        });
    }
    let f = &v.flags;
    let advice = [
        (f.dontdump, libc::MADV_DONTDUMP),
        (f.dontfork, libc::MADV_DONTFORK),
        (f.wipeonfork, libc::MADV_WIPEONFORK),
        (f.hugepage, libc::MADV_HUGEPAGE),
        (f.nohugepage, libc::MADV_NOHUGEPAGE),
    ];
    for (_, adv) in advice.iter().filter(|(on, _)| *on) {
        b.inj.call(
            "madvise",
            nr::x86_64::MADVISE,
            [v.start, v.len(), *adv as u64, 0, 0, 0],
            || format!("{:#x}-{:#x} advice {adv}", v.start, v.end),
        )?;
    }
    Ok(Made {
        start: v.start,
        len: v.len(),
        now,
        want,
    })
}

/// Copies the saved pages into place with `process_vm_writev` straight from
/// a mapping of the pages file: one copy per page.
pub fn fill_pages(b: &Builder, pages: &File, made: &[Made], runs: &[PageRun]) -> Result<()> {
    let task = b.task;
    if task.page_count == 0 || runs.is_empty() {
        return Ok(());
    }
    let len = (PAGE_SIZE * (1 + task.page_count)) as usize;
    let map = FileMap::new(pages, len, false).map_err(|source| Error::Local {
        call: "mmap(pages file)",
        source,
    })?;
    let bar = progress(task.page_count * PAGE_SIZE);
    const CHUNK: usize = 64 << 20;
    let mut batch = Vec::new();
    let mut bytes = 0usize;
    let mut forced = Vec::new();
    for run in runs {
        let offset = ((1 + run.first) * PAGE_SIZE) as usize;
        let n = (run.pages * PAGE_SIZE) as usize;
        let writable = made
            .iter()
            .find(|m| m.start <= run.addr && run.addr < m.start + m.len)
            .is_some_and(|m| m.now & libc::PROT_WRITE as u64 != 0);
        if !writable {
            forced.push((run, offset, n));
            continue;
        }
        // read_task checked that every run lies inside the pages file. A
        // run is cut into CHUNK-sized pieces: one process_vm_writev moves
        // at most 2 GiB, and progress moves on.
        let mut done = 0;
        while done < n {
            let len = (n - done).min(CHUNK);
            batch.push(Transfer {
                remote: run.addr + done as u64,
                local: map.ptr().wrapping_add(offset + done),
                len,
            });
            bytes += len;
            done += len;
            if bytes >= CHUNK {
                write_batch(b.pid, &batch, bytes)?;
                bar.inc(bytes as u64);
                batch.clear();
                bytes = 0;
            }
        }
    }
    write_batch(b.pid, &batch, bytes)?;
    bar.inc(bytes as u64);
    if !forced.is_empty() {
        // /proc/PID/mem writes with FOLL_FORCE, which copies-on-write into
        // private mappings that are not writable.
        use std::os::unix::fs::FileExt;
        let path = format!("/proc/{}/mem", b.pid);
        let mem = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| Error::proc(&path, e))?;
        let mut buf = Vec::new();
        for (run, offset, n) in forced {
            buf.resize(n, 0);
            pages
                .read_exact_at(&mut buf, offset as u64)
                .map_err(|source| Error::Local {
                    call: "pread(pages file)",
                    source,
                })?;
            mem.write_all_at(&buf, run.addr)
                .map_err(|e| Error::Restore {
                    pid: b.pid,
                    problem: format!("writing {n} bytes at {:#x} through {path}: {e}", run.addr),
                })?;
            bar.inc(n as u64);
        }
    }
    bar.finish_and_clear();
    debug!(pid = %b.pid, pages = task.page_count, "pages copied in");
    Ok(())
}

#[allow(unsafe_code)]
fn write_batch(pid: Pid, batch: &[Transfer], bytes: usize) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    // SAFETY: every local pointer lies inside the live read-only FileMap of
    // the pages file (runs were validated against its size); writev only
    // reads from them.
    let n = unsafe { sys::process_vm(pid, batch, true) }.map_err(|source| Error::Sys {
        call: "process_vm_writev(pages)",
        pid,
        source,
    })?;
    if n != bytes {
        return Err(Error::Restore {
            pid,
            problem: format!("process_vm_writev wrote {n} of {bytes} bytes"),
        });
    }
    Ok(())
}

/// Sets every mapping's dumped protection.
pub fn protect(b: &Builder, made: &[Made]) -> Result<()> {
    for m in made.iter().filter(|m| m.now != m.want) {
        b.inj.call(
            "mprotect",
            nr::x86_64::MPROTECT,
            [m.start, m.len, m.want, 0, 0, 0],
            || format!("{:#x}+{:#x} to {:#x}", m.start, m.len, m.want),
        )?;
    }
    Ok(())
}

fn page_at(m: &FileMap, index: u64) -> Option<&[u8]> {
    m.slice(((1 + index) * PAGE_SIZE) as usize, PAGE_SIZE as usize)
}

fn same_mapping(a: &Vma, b: &Vma) -> bool {
    a.start == b.start
        && a.end == b.end
        && a.prot == b.prot
        && a.shared == b.shared
        && a.kind == b.kind
}

/// Builds the memory of a process forked (without exec) from its parent
/// after the parent's memory was built, so that what the two still shared
/// copy-on-write when dumped is shared again: mappings the child has as the
/// parent has them are kept, and of their pages only those whose content
/// differs from the parent's are written; pages the parent has there and
/// the child had not are dropped (`MADV_DONTNEED`). Everything else is made
/// as for a fresh process.
pub fn build_inherited(
    b: &Builder,
    parent: &TaskImage,
    parent_pages: &File,
    pages: &File,
    shmem: &mut Shmem,
) -> Result<()> {
    let task = b.task;
    let kept = |v: &Vma| parent.vmas.iter().any(|p| same_mapping(p, v));
    for p in parent.vmas.iter().filter(|p| p.is_restored()) {
        if !task.vmas.iter().any(|v| same_mapping(p, v)) {
            b.inj.call(
                "munmap",
                nr::x86_64::MUNMAP,
                [p.start, p.len(), 0, 0, 0, 0],
                || format!("inherited mapping {:#x}-{:#x}", p.start, p.end),
            )?;
        }
    }
    let vdso = |t: &TaskImage| -> Vec<(u64, u64)> {
        t.vmas
            .iter()
            .filter(|v| matches!(v.kind, VmaKind::Vdso { .. }))
            .map(|v| (v.start, v.end))
            .collect()
    };
    if vdso(parent) != vdso(task) {
        for (start, end) in vdso(parent) {
            b.inj.call(
                "munmap",
                nr::x86_64::MUNMAP,
                [start, end - start, 0, 0, 0, 0],
                || format!("inherited vDSO part {start:#x}-{end:#x}"),
            )?;
        }
        map_vdso(b)?;
    }

    let mut fds: HashMap<(PathBuf, bool), u64> = HashMap::new();
    let mut made = Vec::new();
    let result = (|| {
        for v in task.vmas.iter().filter(|v| v.is_restored() && !kept(v)) {
            made.push(map_one(b, v, &mut fds, shmem)?);
        }
        Ok(())
    })();
    for fd in fds.into_values() {
        b.close(fd)?;
    }
    result?;
    let new = made.len();
    for v in task.vmas.iter().filter(|v| v.is_restored() && kept(v)) {
        made.push(Made {
            start: v.start,
            len: v.len(),
            now: v.prot.bits(),
            want: v.prot.bits(),
        });
    }

    let map_of = |f: &File, count: u64| {
        FileMap::new(f, (PAGE_SIZE * (1 + count)) as usize, false).map_err(|source| Error::Local {
            call: "mmap(pages file)",
            source,
        })
    };
    let pmap = map_of(parent_pages, parent.page_count)?;
    let cmap = map_of(pages, task.page_count)?;
    // Private mappings kept from the parent: their pages may be shared.
    let cow = |addr: u64| {
        task.vmas
            .iter()
            .find(|v| v.start <= addr && addr < v.end)
            .is_some_and(|v| !v.shared && kept(v))
    };
    let mut parent_index: HashMap<u64, u64> = HashMap::new();
    for run in &parent.pages {
        for i in 0..run.pages {
            let addr = run.addr + i * PAGE_SIZE;
            if cow(addr) {
                parent_index.insert(addr, run.first + i);
            }
        }
    }
    let mut writes: Vec<PageRun> = Vec::new();
    let mut shared_pages = 0u64;
    for run in &task.pages {
        for i in 0..run.pages {
            let addr = run.addr + i * PAGE_SIZE;
            let index = run.first + i;
            // Pages of a kept shared object are written too: the object is
            // the parent's, but a page only this process had mapped is in
            // this image alone.
            if let Some(pi) = parent_index.remove(&addr)
                && page_at(&pmap, pi).is_some()
                && page_at(&pmap, pi) == page_at(&cmap, index)
            {
                shared_pages += 1;
                continue;
            }
            match writes.last_mut() {
                Some(w) if w.addr + w.pages * PAGE_SIZE == addr && w.first + w.pages == index => {
                    w.pages += 1
                }
                _ => writes.push(PageRun {
                    addr,
                    pages: 1,
                    first: index,
                }),
            }
        }
    }
    fill_pages(b, pages, &made, &writes)?;
    // What is left in parent_index the parent has and the child had not.
    let mut drop: Vec<u64> = parent_index.into_keys().collect();
    drop.sort_unstable();
    let mut i = 0;
    while i < drop.len() {
        let start = drop[i];
        let mut end = start + PAGE_SIZE;
        while i + 1 < drop.len() && drop[i + 1] == end {
            end += PAGE_SIZE;
            i += 1;
        }
        b.inj.call(
            "madvise(MADV_DONTNEED)",
            nr::x86_64::MADVISE,
            [start, end - start, libc::MADV_DONTNEED as u64, 0, 0, 0],
            || format!("{start:#x}-{end:#x}"),
        )?;
        i += 1;
    }
    protect(b, &made[..new])?;
    debug!(pid = %b.pid, shared_pages, written = writes.iter().map(|w| w.pages).sum::<u64>(), "memory built from the parent's");
    Ok(())
}

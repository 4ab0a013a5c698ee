//! The stub: a tiny static ELF of the restored task's own width, made here
//! in memory. Exec'ing it gives the new task everything only an exec of the
//! right ELF class gives (compat mode and address limit for ia32, the
//! `[vsyscall]` page only for x86_64, the core file format), after which the
//! restorer replaces its memory entirely from outside.
//!
//! Its code is two instructions the restorer points the task at:
//! `syscall` at `SYSCALL_OFF` and `int 0x80` at `INT80_OFF`, each followed by
//! `int3`. The task itself never runs anything: ptrace stops it at exec.

use crate::arch::Abi;

/// Where the stub is loaded. Its pages are unmapped before any of the
/// task's own mappings are made, so this only has to be a legal address.
pub const BASE_64: u64 = 0x0040_0000;
pub const BASE_32: u64 = 0x0804_8000;

/// Code bytes, placed at the same offsets in the parking page.
pub const CODE: [u8; 16] = [
    0x0f, 0x05, 0xcc, 0x90, 0x90, 0x90, 0x90, 0x90, // syscall; int3
    0xcd, 0x80, 0xcc, 0x90, 0x90, 0x90, 0x90, 0x90, // int 0x80; int3
];
pub const SYSCALL_OFF: u64 = 0;
pub const INT80_OFF: u64 = 8;

const PT_LOAD: u32 = 1;
const PT_GNU_STACK: u32 = 0x6474_e551;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PF_R: u32 = 4;

/// The address of the stub's code once loaded.
pub fn entry(abi: Abi) -> u64 {
    build(abi).1
}

/// Builds the stub ELF for `abi`; returns the image and its code address.
pub fn build(abi: Abi) -> (Vec<u8>, u64) {
    match abi {
        Abi::X86_64 => build64(),
        Abi::Ia32 => build32(),
    }
}

fn ident(class: u8) -> [u8; 16] {
    // ELF magic, class, little-endian, version 1, System V ABI.
    [
        0x7f, b'E', b'L', b'F', class, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]
}

fn build64() -> (Vec<u8>, u64) {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let code_off = (EHDR + 2 * PHDR) as u64;
    let total = code_off + CODE.len() as u64;
    let entry = BASE_64 + code_off;
    let mut out = Vec::new();
    out.extend_from_slice(&ident(2));
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&entry.to_le_bytes());
    out.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [EHDR as u16, PHDR as u16, 2, 64, 0, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let phdr = |out: &mut Vec<u8>, ty: u32, flags: u32, vaddr: u64, size: u64| {
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // p_offset
        out.extend_from_slice(&vaddr.to_le_bytes());
        out.extend_from_slice(&vaddr.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&0x1000u64.to_le_bytes());
    };
    phdr(&mut out, PT_LOAD, PF_R | PF_X, BASE_64, total);
    phdr(&mut out, PT_GNU_STACK, PF_R | PF_W, 0, 0);
    out.extend_from_slice(&CODE);
    (out, entry)
}

fn build32() -> (Vec<u8>, u64) {
    const EHDR: usize = 52;
    const PHDR: usize = 32;
    let code_off = (EHDR + 2 * PHDR) as u32;
    let total = code_off + CODE.len() as u32;
    let base = BASE_32 as u32;
    let entry = base + code_off;
    let mut out = Vec::new();
    out.extend_from_slice(&ident(1));
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&3u16.to_le_bytes()); // EM_386
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&entry.to_le_bytes());
    out.extend_from_slice(&(EHDR as u32).to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [EHDR as u16, PHDR as u16, 2, 40, 0, 0] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let phdr = |out: &mut Vec<u8>, ty: u32, flags: u32, vaddr: u32, size: u32| {
        for v in [ty, 0, vaddr, vaddr, size, size, flags, 0x1000] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    };
    phdr(&mut out, PT_LOAD, PF_R | PF_X, base, total);
    phdr(&mut out, PT_GNU_STACK, PF_R | PF_W, 0, 0);
    out.extend_from_slice(&CODE);
    (out, entry as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_consistent() {
        for abi in [Abi::X86_64, Abi::Ia32] {
            let (elf, entry) = build(abi);
            assert_eq!(Abi::from_elf_ident(&elf), Some(abi));
            let base = if abi == Abi::X86_64 { BASE_64 } else { BASE_32 };
            let off = (entry - base) as usize;
            assert_eq!(&elf[off..off + 2], &[0x0f, 0x05]);
            assert_eq!(elf.len(), off + CODE.len());
        }
    }
}

//! Segment descriptors: converting the raw 8-byte entries that
//! `modify_ldt(0)` returns into the `struct user_desc` that `modify_ldt(1)`
//! and `set_thread_area` take.

use crate::sys::UserDesc;

const SEG_32BIT: u32 = 1 << 0;
const CONTENTS_SHIFT: u32 = 1;
const READ_EXEC_ONLY: u32 = 1 << 3;
const LIMIT_IN_PAGES: u32 = 1 << 4;
const SEG_NOT_PRESENT: u32 = 1 << 5;
const USEABLE: u32 = 1 << 6;
const LM: u32 = 1 << 7;

/// Decodes one raw descriptor; `None` for an empty (all-zero) slot.
pub fn decode(entry: u32, raw: u64) -> Option<UserDesc> {
    if raw == 0 {
        return None;
    }
    let lo = raw as u32;
    let hi = (raw >> 32) as u32;
    let base = (lo >> 16) | ((hi & 0xff) << 16) | (hi & 0xff00_0000);
    let limit = (lo & 0xffff) | (hi & 0x000f_0000);
    let ty = (hi >> 8) & 0xf;
    let bit = |n: u32| (hi >> n) & 1 == 1;
    let mut flags = ((ty >> 2) & 3) << CONTENTS_SHIFT;
    if ty & 0b10 == 0 {
        flags |= READ_EXEC_ONLY;
    }
    if !bit(15) {
        flags |= SEG_NOT_PRESENT;
    }
    if bit(20) {
        flags |= USEABLE;
    }
    if bit(21) {
        flags |= LM;
    }
    if bit(22) {
        flags |= SEG_32BIT;
    }
    if bit(23) {
        flags |= LIMIT_IN_PAGES;
    }
    Some(UserDesc {
        entry_number: entry,
        base_addr: base,
        limit,
        flags,
    })
}

/// Decodes the table that `modify_ldt(0)` wrote.
pub fn decode_table(bytes: &[u8]) -> Vec<UserDesc> {
    bytes
        .chunks_exact(8)
        .enumerate()
        .filter_map(|(i, c)| {
            let raw = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            decode(i as u32, raw)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes like the kernel's fill_ldt(), for the round-trip test.
    fn encode(d: &UserDesc) -> u64 {
        let f = d.flags;
        let ty = (((f & READ_EXEC_ONLY == 0) as u32) << 1) | (((f >> CONTENTS_SHIFT) & 3) << 2) | 1;
        let lo = (d.limit & 0xffff) | (d.base_addr << 16);
        let hi = ((d.base_addr >> 16) & 0xff)
            | (ty << 8)
            | (1 << 12)
            | (3 << 13)
            | (((f & SEG_NOT_PRESENT == 0) as u32) << 15)
            | (d.limit & 0xf_0000)
            | (((f & USEABLE != 0) as u32) << 20)
            | (((f & LM != 0) as u32) << 21)
            | (((f & SEG_32BIT != 0) as u32) << 22)
            | (((f & LIMIT_IN_PAGES != 0) as u32) << 23)
            | (d.base_addr & 0xff00_0000);
        (lo as u64) | ((hi as u64) << 32)
    }

    #[test]
    fn round_trips_data_and_code_descriptors() {
        for flags in [
            SEG_32BIT | LIMIT_IN_PAGES | USEABLE,
            SEG_32BIT | (2 << CONTENTS_SHIFT),
            READ_EXEC_ONLY,
        ] {
            let d = UserDesc {
                entry_number: 3,
                base_addr: 0x1234_5678,
                limit: 0xfffff,
                flags,
            };
            assert_eq!(decode(3, encode(&d)), Some(d));
        }
    }

    #[test]
    fn empty_slots_are_skipped() {
        let mut table = vec![0u8; 24];
        let d = UserDesc {
            entry_number: 1,
            base_addr: 0x8000,
            limit: 0xff,
            flags: SEG_32BIT,
        };
        table[8..16].copy_from_slice(&encode(&d).to_le_bytes());
        assert_eq!(decode_table(&table), vec![d]);
    }
}

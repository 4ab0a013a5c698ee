//! A restored process that crashes must leave a core file of its own width:
//! ELF32 for a 32-bit task, ELF64 for a 64-bit one.

#[macro_use]
mod common;

use std::fs;
use std::path::Path;
use std::sync::Mutex;

use common::{Fixture, Width};

/// core_pattern is machine-wide: one crash test at a time.
static CORE_PATTERN: Mutex<()> = Mutex::new(());
const PATTERN_FILE: &str = "/proc/sys/kernel/core_pattern";

/// Makes cores land in the crashing process's cwd, restoring the old
/// pattern on drop. Err says why that is impossible here.
struct CorePattern {
    old: Option<String>,
}

impl CorePattern {
    fn set_up() -> Result<CorePattern, String> {
        let old = fs::read_to_string(PATTERN_FILE)
            .map_err(|e| format!("cannot read {PATTERN_FILE}: {e}"))?;
        let old = old.trim_end_matches('\n').to_owned();
        if !old.starts_with('|') && !old.contains('/') {
            return Ok(CorePattern { old: None });
        }
        fs::write(PATTERN_FILE, "core.%p").map_err(|e| {
            format!("core_pattern is {old:?} (not a file in the cwd) and cannot be set: {e}")
        })?;
        Ok(CorePattern { old: Some(old) })
    }
}

impl Drop for CorePattern {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            let _ = fs::write(PATTERN_FILE, old);
        }
    }
}

/// (ELF class, machine) of the first core file in `dir`.
fn find_core(dir: &Path) -> Option<(u8, u16)> {
    for entry in fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        if !path.is_file() {
            continue;
        }
        let Ok(bytes) = fs::read(&path) else { continue };
        let is_core = bytes.len() > 20
            && &bytes[..4] == b"\x7fELF"
            && u16::from_le_bytes([bytes[16], bytes[17]]) == 4; // ET_CORE
        if is_core {
            return Some((bytes[4], u16::from_le_bytes([bytes[18], bytes[19]])));
        }
    }
    None
}

fn crash(w: Width, how: &str, signal: i32, dump: bool) {
    let _one_at_a_time = CORE_PATTERN.lock().unwrap_or_else(|e| e.into_inner());
    let _pattern = match CorePattern::set_up() {
        Ok(p) => p,
        Err(why) => {
            common::skip(&why);
            return;
        }
    };
    let mut fx = Fixture::start("crash", w, &[how]);
    if dump {
        fx.dump(&[]);
        fx.restore();
    }
    fx.go();
    let code = fx.wait_end();
    let out = fx.output();
    assert_eq!(
        code,
        Some(128 + signal),
        "expected death by signal {signal}; output:\n{out}"
    );
    assert!(
        out.contains("CRASHING"),
        "the fixture did not get to crash:\n{out}"
    );
    let (class, machine) = find_core(&fx.dir.path)
        .unwrap_or_else(|| panic!("no core file in {}", fx.dir.path.display()));
    let (want_class, want_machine) = match w {
        Width::W32 => (1, 3),  // ELFCLASS32, EM_386
        Width::W64 => (2, 62), // ELFCLASS64, EM_X86_64
    };
    assert_eq!(
        (class, machine),
        (want_class, want_machine),
        "a {}-bit task left a core of class {class}, machine {machine}",
        w.bits()
    );
}

both_widths!(segv_baseline, |w| crash(w, "segv", libc::SIGSEGV, false));
both_widths!(segv_after_restore, |w| crash(
    w,
    "segv",
    libc::SIGSEGV,
    true
));
both_widths!(abort_after_restore, |w| crash(
    w,
    "abort",
    libc::SIGABRT,
    true
));

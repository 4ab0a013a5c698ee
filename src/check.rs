//! `cryopod check`: are the kernel features cryopod relies on present?
//! Each check tries the feature for real where it can.

use crate::arch::{Abi, USER32_CS, nr};
use crate::inject::Injector;
use crate::restore::spawn;
use crate::sys::{self, Pid};

/// One line of the report.
pub struct Finding {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn finding(name: &'static str, r: std::result::Result<String, String>) -> Finding {
    match r {
        Ok(detail) => Finding {
            name,
            ok: true,
            detail,
        },
        Err(detail) => Finding {
            name,
            ok: false,
            detail,
        },
    }
}

pub fn run() -> Vec<Finding> {
    vec![
        finding("ptrace", ptrace_allowed()),
        finding("clone3 with set_tid", set_tid_allowed()),
        finding(
            "PR_SET_MM_MAP",
            sys::prctl_mm_map_size()
                .map(|n| format!("struct of {n} bytes"))
                .map_err(|e| format!("{e} (kernel without CONFIG_CHECKPOINT_RESTORE?)")),
        ),
        finding("process_vm_readv", vm_readv_works()),
        finding(
            "native task, xstate, vDSO placement",
            stub_checks(Abi::X86_64),
        ),
        finding(
            "ia32 task, vDSO placement (ARCH_MAP_VDSO_32)",
            stub_checks(Abi::Ia32),
        ),
    ]
}

fn ptrace_allowed() -> std::result::Result<String, String> {
    match std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
        Ok(s) if s.trim() == "3" => {
            Err("yama ptrace_scope is 3: ptrace is disabled until reboot".into())
        }
        Ok(s) => Ok(format!("yama ptrace_scope {}", s.trim())),
        Err(_) => Ok("no yama restrictions".into()),
    }
}

fn set_tid_allowed() -> std::result::Result<String, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    const CAP_SYS_ADMIN: u64 = 21;
    const CAP_CHECKPOINT_RESTORE: u64 = 40;
    if cap_eff & (1 << CAP_CHECKPOINT_RESTORE) != 0 || cap_eff & (1 << CAP_SYS_ADMIN) != 0 {
        Ok(format!(
            "kernel {}, CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN held",
            sys::kernel_release()
        ))
    } else {
        Err("needs CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN (run as root)".into())
    }
}

fn vm_readv_works() -> std::result::Result<String, String> {
    let me = Pid(std::process::id() as i32);
    let probe = [0x5au8; 64];
    let got =
        sys::read_remote(me, probe.as_ptr() as u64, probe.len()).map_err(|e| e.to_string())?;
    if got == probe {
        Ok("reads another address space".into())
    } else {
        Err("returned wrong bytes".into())
    }
}

/// Starts the stub of `abi`, checks its mode and xstate, and moves its vDSO
/// with `arch_prctl(ARCH_MAP_VDSO_*)`, the way restore does.
fn stub_checks(abi: Abi) -> std::result::Result<String, String> {
    let mut family = spawn::Family::new();
    let stubs = spawn::Stubs::new().map_err(|e| e.to_string())?;
    let (pid, code) = spawn::spawn(&mut family, &stubs, None, abi).map_err(|e| e.to_string())?;
    let regs = sys::ptrace_getregs(pid).map_err(|e| format!("PTRACE_GETREGS: {e}"))?;
    if (abi == Abi::Ia32) != (regs.cs == USER32_CS) {
        return Err(format!("stub runs with CS {:#x}", regs.cs));
    }
    let xstate =
        sys::ptrace_get_xstate(pid).map_err(|e| format!("PTRACE_GETREGSET(NT_X86_XSTATE): {e}"))?;
    let inj = Injector::new(pid, regs, code, Some(code + 8));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| e.to_string())?;
    let vdso: Vec<(u64, u64)> = maps
        .lines()
        .filter(|l| l.contains("[vdso]") || l.contains("[vvar"))
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect();
    let start = vdso
        .iter()
        .map(|r| r.0)
        .min()
        .ok_or("the stub has no vDSO")?;
    let err = |what: &str, e: crate::error::Error| format!("{what}: {e}");
    for (a, b) in &vdso {
        inj.call(
            "munmap",
            nr::x86_64::MUNMAP,
            [*a, b - a, 0, 0, 0, 0],
            String::new,
        )
        .map_err(|e| err("munmap of the vDSO", e))?;
    }
    let op = if abi == Abi::Ia32 { 0x2002 } else { 0x2003 };
    inj.call(
        "arch_prctl",
        nr::x86_64::ARCH_PRCTL,
        [op, start, 0, 0, 0, 0],
        String::new,
    )
    .map_err(|e| err("arch_prctl(ARCH_MAP_VDSO)", e))?;
    drop(family);
    Ok(format!(
        "CS {:#x}, xstate {} bytes, vDSO remapped",
        regs.cs,
        xstate.len()
    ))
}

/// Prints the report; true when everything needed is present.
pub fn report(findings: &[Finding]) -> bool {
    for f in findings {
        let mark = if f.ok { "ok     " } else { "MISSING" };
        println!("{mark} {}: {}", f.name, f.detail);
    }
    let all = findings.iter().all(|f| f.ok);
    println!(
        "{}",
        if all {
            "Looks good: cryopod can dump and restore native and ia32 tasks here."
        } else {
            "Some features cryopod needs are missing (see above)."
        }
    );
    all
}

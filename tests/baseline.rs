//! Every fixture run without any dump: its own checks must pass. A failure
//! here is a broken fixture (or a missing package), not a cryopod bug.

#[macro_use]
mod common;

use common::baseline;

both_widths!(memory, |w| baseline("memory", w, &[]));
both_widths!(registers, |w| baseline("registers", w, &[]));
both_widths!(signals, |w| baseline("signals", w, &[]));
both_widths!(syscall_nanosleep, |w| baseline(
    "syscall",
    w,
    &["nanosleep"]
));
both_widths!(syscall_ppoll, |w| baseline("syscall", w, &["ppoll"]));
both_widths!(syscall_usleep, |w| baseline("syscall", w, &["usleep"]));
both_widths!(syscall_sigsuspend, |w| {
    let mut fx = common::Fixture::start("syscall", w, &["sigsuspend"]);
    fx.go();
    common::kill(fx.pid, libc::SIGUSR1);
    fx.expect_pass();
});
both_widths!(files, |w| baseline("files", w, &[]));
both_widths!(ldt, |w| baseline("ldt", w, &[]));
both_widths!(modeswitch, |w| baseline("modeswitch", w, &[]));
both_widths!(threads, |w| baseline("threads", w, &[]));
both_widths!(threads_state, |w| baseline("threads_state", w, &[]));
both_widths!(threads_race, |w| baseline("threads_race", w, &[]));
// A tree of both widths (the root execs the other width's build, which
// must be built too).
both_widths!(tree, |w| {
    common::fixture("tree", common::Width::W64);
    common::fixture("tree", common::Width::W32);
    let shape = match w {
        common::Width::W64 => "64,32,64",
        common::Width::W32 => "32,64,32",
    };
    baseline("tree", w, &[shape])
});

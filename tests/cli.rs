//! The small commands: `check` and `show`.

#[macro_use]
mod common;

use common::{Fixture, TestDir, assert_show_works, cryopod};

#[test]
fn check_reports_all_features_present() {
    let dir = TestDir::new("check");
    let run = cryopod(&dir.path, &["check"]);
    run.assert_ok();
    assert!(
        !(run.stdout.trim().is_empty() && run.stderr.trim().is_empty()),
        "cryopod check printed nothing"
    );
}

both_widths!(show_prints_json, |w| {
    let mut fx = Fixture::start("memory", w, &[]);
    fx.dump(&[]);
    assert_show_works(&fx);
});

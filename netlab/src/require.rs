//! Skipping a test whose prerequisites this machine lacks, or failing it in CI.
//!
//! Tests that need root, network namespaces, nftables, `/dev/kvm`, userfaultfd, huge pages or a
//! tool such as iperf3 cannot run everywhere. On a developer's machine such a test returns early
//! after printing one line, `SKIPPED <test>: <what is missing and how to get it>`. In CI a skip
//! would hide a test that never ran, so there `.ci/run` sets [`REQUIRE_VAR`]`=1` and the same
//! call panics instead, failing the test with the same reason.
//!
//! Every test crate of the workspace with such tests uses this module (netlab is a dependency or
//! dev-dependency of each), so the rule is in one place:
//!
//! ```no_run
//! #[test]
//! fn lossy_multicast() {
//!     if !netlab::require::lossy_lab("lossy_multicast") {
//!         return;
//!     }
//!     // ... build a lab with loss ...
//! }
//! ```
//!
//! A crate-specific prerequisite goes through [`skip_or_fail`], [`available`] or [`ok_or_skip`]:
//!
//! ```no_run
//! fn open_kvm(test: &str) -> Option<std::fs::File> {
//!     let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
//!     netlab::require::ok_or_skip(test, kvm.map_err(|e| format!("/dev/kvm is not usable ({e}): run as root on a machine with KVM")))
//! }
//! ```
//!
//! The `SKIPPED` line is written straight to the process's standard error, past the test
//! harness's output capture, so it shows in every `cargo test` run (and `.ci/run` can look for it).

use std::fmt::Display;
use std::io::Write;

/// The environment variable that turns a skip into a failure when set to `1`.
pub const REQUIRE_VAR: &str = "NETLAB_REQUIRE";

/// Whether skipping is forbidden: [`REQUIRE_VAR`] is `1` (as in CI).
pub fn required() -> bool {
    std::env::var(REQUIRE_VAR).is_ok_and(|v| v == "1")
}

/// The test `test` cannot run here because of `why` (say what is missing and how to get it).
///
/// Prints `SKIPPED {test}: {why}` to standard error and returns, so the caller returns next; with
/// `NETLAB_REQUIRE=1` it panics with the same reason instead.
///
/// # Panics
///
/// When [`required`]: the test must run, so its missing prerequisite fails it.
#[track_caller]
pub fn skip_or_fail(test: &str, why: impl Display) {
    match verdict(required(), test, &why) {
        Ok(line) => {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
        Err(failure) => panic!("{failure}"),
    }
}

/// What [`skip_or_fail`] does: `Ok(line to print)` for a skip, `Err(panic message)` when required.
fn verdict(required: bool, test: &str, why: &dyn Display) -> Result<String, String> {
    if required {
        Err(format!("{test} cannot run here and {REQUIRE_VAR}=1 forbids skipping it: {why}"))
    } else {
        Ok(format!("SKIPPED {test}: {why}"))
    }
}

/// `true` if `check` passed; otherwise [`skip_or_fail`] with its error and `false`.
#[track_caller]
pub fn available<E: Display>(test: &str, check: Result<(), E>) -> bool {
    ok_or_skip(test, check).is_some()
}

/// The value of `result`, or [`skip_or_fail`] with its error and `None`.
#[track_caller]
pub fn ok_or_skip<T, E: Display>(test: &str, result: Result<T, E>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(why) => {
            skip_or_fail(test, why);
            None
        }
    }
}

/// `true` if this process can build a lab without loss or cut rules (root, `ip`, `tc`; see
/// [`crate::check_prerequisites`]); otherwise [`skip_or_fail`] and `false`.
#[track_caller]
pub fn lab(test: &str) -> bool {
    available(test, crate::check_prerequisites())
}

/// [`lab`], and `nft` (nftables) is installed for loss and cut rules.
#[track_caller]
pub fn lossy_lab(test: &str) -> bool {
    available(test, crate::check_prerequisites().and_then(|()| crate::preflight::check_nft()))
}

/// `true` if `program` is on the `PATH`; otherwise [`skip_or_fail`] (naming the Debian `package`
/// to install) and `false`.
#[track_caller]
pub fn program(test: &str, program: &str, package: &str) -> bool {
    if crate::cmd::find_program(program).is_some() {
        return true;
    }
    skip_or_fail(
        test,
        format_args!("`{program}` is not installed (apt-get install -y {package}, or run scripts/setup.sh as root)"),
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    // The decision only: calling skip_or_fail here would print a SKIPPED line (which `.ci/run`
    // rejects) or depend on the environment the tests run in.
    #[test]
    fn a_skip_prints_the_reason_and_a_required_test_fails_with_it() {
        assert_eq!(
            verdict(false, "a_test", &"no /dev/kvm (run as root)"),
            Ok("SKIPPED a_test: no /dev/kvm (run as root)".into())
        );
        let failure = verdict(true, "a_test", &"no /dev/kvm (run as root)").expect_err("required: no skip");
        assert!(failure.contains("a_test") && failure.contains("no /dev/kvm (run as root)"), "{failure}");
        assert!(failure.contains("NETLAB_REQUIRE=1") && !failure.contains("SKIPPED"), "{failure}");
    }

    #[test]
    fn results_and_checks_that_pass_never_skip() {
        // These return before deciding anything, whatever NETLAB_REQUIRE says.
        assert_eq!(ok_or_skip("a_test", Ok::<u8, &str>(3)), Some(3));
        assert!(available("a_test", Ok::<(), &str>(())));
        assert!(program("a_test", "sh", "dash"));
    }
}

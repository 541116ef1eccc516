//! Fault injection for tests: `FABVM_TEST_FAILPOINT=NAME` makes the process die at the point
//! named `NAME`, as a crashed or killed host would (exit 3, nothing cleaned up).

/// Ends the process here when `FABVM_TEST_FAILPOINT` names `name`.
pub fn failpoint(name: &str) {
    if std::env::var("FABVM_TEST_FAILPOINT").as_deref() == Ok(name) {
        eprintln!("fabvm: failpoint {name}: exiting");
        std::process::exit(3);
    }
}

//! Tests of the sharing leader's planning.

use super::*;

fn scans(full: u64, pages: u64) -> Scans {
    Scans { full, pages }
}

#[test]
fn fast_until_converged() {
    let mut tuner = Tuner::default();
    tuner.reset(scans(10, 0));
    assert_eq!(
        tuner.want(0, 0, scans(10, 0), 0),
        Want::Normal,
        "nothing to merge"
    );
    assert_eq!(
        tuner.want(100_000, 0, scans(10, 0), 200_000),
        Want::Fast(10_000, FAST_SLEEP_MS)
    );
    assert_eq!(
        tuner.want(100_000, 50_000, scans(11, 0), 4_000),
        Want::Fast(FAST_BATCH_MIN, FAST_SLEEP_MS)
    );
    assert_eq!(
        tuner.want(100_000, 99_500, scans(12, 0), 4_000),
        Want::Normal
    );
}

#[test]
fn a_plateau_stops_the_fast_scan_until_pages_are_marked_again() {
    let mut tuner = Tuner::default();
    tuner.reset(scans(0, 0));
    let fast = |tuner: &mut Tuner, full, pages| {
        matches!(
            tuner.want(1000, 500, scans(full, pages), 2000),
            Want::Fast(..)
        )
    };
    assert!(fast(&mut tuner, 1, 2000), "progress");
    // Quick full scans that cannot have seen the marked pages are not passes.
    assert!(fast(&mut tuner, 30, 2100));
    assert!(fast(&mut tuner, 31, 9000));
    assert!(
        !fast(&mut tuner, 32, 10_000),
        "four passes without progress"
    );
    tuner.reset(scans(32, 10_000));
    assert!(fast(&mut tuner, 33, 11_000));
}

#[test]
fn passes_need_whole_scans_and_enough_pages() {
    let since = scans(5, 1000);
    assert_eq!(scans(9, 1000 + 2 * 500).passes_since(since, 500), 2);
    assert_eq!(scans(6, 1000 + 10 * 500).passes_since(since, 500), 1);
    // Without a pages counter the scan under way when pages were marked does not count.
    assert_eq!(scans(8, 0).passes_since(scans(5, 0), 500), 2);
}

#[test]
fn change_fraction() {
    assert_eq!(changed(&[1, 2, 3, 4], &[1, 2, 3, 4]), 0.0);
    assert_eq!(changed(&[1, 2, 3, 4], &[1, 0, 3, 4]), 0.25);
    assert_eq!(changed(&[1], &[1, 2]), 1.0);
}

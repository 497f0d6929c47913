//! Test support for the end-to-end tests of the passthrough crate: the
//! [`host::ModelHost`] platform over the drivers' register models, a
//! [`walk`]er that decodes what the drivers wrote, and the checks that tie
//! each change to the invalidation that covers it.
#![allow(dead_code)]

pub mod host;
pub mod walk;

use host::{ModelHost, View};

/// When the newest of `words` last changed in `view`, if after `since`.
pub fn changed_since(host: &ModelHost, view: View, words: &[u64], since: u64) -> Option<u64> {
    words.iter().map(|&w| host.mem.changed_at(view, w)).filter(|&s| s > since).max()
}

/// Asserts that `log` holds, at or after stamp `changed`, an invalidation
/// `covers` accepts, followed by a wait whose status write tells the driver
/// it completed.
pub fn vtd_invalidated(
    log: &[vtd::testing::Logged],
    changed: u64,
    what: &str,
    covers: impl Fn(&vtd::testing::Invalidation) -> bool,
) {
    use vtd::testing::Invalidation;
    let Some(i) = log.iter().position(|l| l.stamp >= changed && covers(&l.what)) else {
        panic!("{what}: no invalidation after the change (stamp {changed}); the unit ran {log:#?}")
    };
    assert!(
        log[i..].iter().any(|l| matches!(l.what, Invalidation::Wait { status: Some(_) })),
        "{what}: the invalidation was not waited for: {log:#?}"
    );
}

/// As [`vtd_invalidated`], for an AMD-Vi unit's command log.
pub fn amd_invalidated(
    log: &[amdvi::testing::Logged],
    changed: u64,
    what: &str,
    covers: impl Fn(&amdvi::testing::Invalidation) -> bool,
) {
    use amdvi::testing::Invalidation;
    let Some(i) = log.iter().position(|l| l.stamp >= changed && covers(&l.what)) else {
        panic!("{what}: no invalidation after the change (stamp {changed}); the unit ran {log:#?}")
    };
    assert!(
        log[i..].iter().any(|l| matches!(l.what, Invalidation::CompletionWait { store: Some(_) })),
        "{what}: the invalidation was not waited for: {log:#?}"
    );
}

/// The stamp of the first invalidation in `log` at or after `changed` that
/// `covers` accepts (VT-d).
pub fn vtd_first(
    log: &[vtd::testing::Logged],
    changed: u64,
    covers: impl Fn(&vtd::testing::Invalidation) -> bool,
) -> Option<u64> {
    log.iter().find(|l| l.stamp >= changed && covers(&l.what)).map(|l| l.stamp)
}

/// The stamp of the first command in `log` at or after `changed` that
/// `covers` accepts (AMD-Vi).
pub fn amd_first(
    log: &[amdvi::testing::Logged],
    changed: u64,
    covers: impl Fn(&amdvi::testing::Invalidation) -> bool,
) -> Option<u64> {
    log.iter().find(|l| l.stamp >= changed && covers(&l.what)).map(|l| l.stamp)
}

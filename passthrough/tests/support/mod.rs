//! Test support for the end-to-end tests of the passthrough crate: the
//! [`host::ModelHost`] platform over the drivers' register models, a
//! [`walk`]er that decodes what the drivers wrote, and the checks that tie
//! each change to the invalidation that covers it.
#![allow(dead_code)]

pub mod host;
pub mod walk;

use host::{ModelHost, View};
use walk::Walk;

/// The walk of requester `rid` at `iova` on unit `base`; a walk that cannot
/// be decoded fails the test.
pub fn walk(host: &ModelHost, base: u64, rid: u16, iova: u64) -> Walk {
    walk::translate(host, base, rid, iova)
        .unwrap_or_else(|e| panic!("walk of {rid:#06x} at {iova:#x} on {base:#x}: {e:?}"))
}

/// Asserts requester `rid`'s DMA at `iova` on unit `base` is blocked.
pub fn assert_blocked(host: &ModelHost, base: u64, rid: u16, iova: u64, what: &str) {
    let w = walk(host, base, rid, iova);
    assert!(w.blocked(), "{what}: {rid:#06x} at {iova:#x} on {base:#x} is not blocked: {:?}", w.outcome);
}

/// Every page of `region` reaches its host page, for reads and writes.
pub fn assert_maps(host: &ModelHost, base: u64, rid: u16, (gpa, hpa, len): (u64, u64, u64)) {
    for off in (0..len).step_by(4096) {
        let w = walk(host, base, rid, gpa + off + 0x18);
        assert_eq!(w.hpa(false), Some(hpa + off + 0x18), "{rid:#06x} reading GPA {:#x}: {:?}", gpa + off, w.outcome);
        assert_eq!(w.hpa(true), Some(hpa + off + 0x18), "{rid:#06x} writing GPA {:#x}: {:?}", gpa + off, w.outcome);
    }
}

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

//! The state every guest of one [`crate::Iommus`] shares: the isolation
//! groups, who owns each, how many of an owner's functions hold each group,
//! and the fault streams.
//!
//! Locking: one lock (`Machine::state`), a leaf: held only to look up or
//! change ownership and queues, never across a unit operation. Unit
//! polling happens outside it; routing the polled faults takes it after.

use crate::error::Function;
use crate::ownership::{GroupId, Groups, GuestId, Owner, Owners, Taken};
use alloc::collections::{BTreeMap, VecDeque};
use alloc::sync::Arc;
use alloc::vec::Vec;
use portcullis_iommu::unit::{DmaFault, IommuUnit};

/// Faults each owner's queue keeps before counting the rest as lost.
pub const FAULT_QUEUE: usize = 256;

/// A DMA fault routed to its group's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutedFault {
    /// Unit index.
    pub unit: usize,
    /// The group the requester id belongs to.
    pub group: GroupId,
    /// What the unit recorded.
    pub fault: DmaFault,
}

/// One owner's faults: those not read yet, and how many were lost.
#[derive(Debug, Default)]
struct Queue {
    faults: VecDeque<RoutedFault>,
    lost: u64,
}

/// Faults read from a stream: each only once, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultBatch<F> {
    /// The faults not read before.
    pub faults: Vec<F>,
    /// Faults lost since the last read: the unit's recording overflowed
    /// (for every owner with devices on that unit, as the unit cannot say
    /// whose they were) or this queue was full.
    pub lost: u64,
}

#[derive(Debug, Default)]
struct State {
    owners: Owners,
    /// Functions (assigned, or claimed for the host) holding each group
    /// for its owner, and who holds each; the group is released when none
    /// is left.
    holds: BTreeMap<GroupId, Vec<(Function, Holder)>>,
    next_guest: u32,
    next_view: u32,
    queues: BTreeMap<Owner, Queue>,
    /// Overflow counts seen per unit.
    overflows: BTreeMap<usize, u64>,
}

/// Who holds a function for its owner: [`crate::Iommus::claim_for_host`],
/// or one DMA view (a guest's, or one of the host's `GuestDma`s). Two
/// holders of the same owner never hold the same function, and each
/// lets go only of what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holder {
    /// Claimed for the host.
    Claim,
    /// Assigned to the DMA view with this number.
    View(u32),
}

/// The shared machine-wide state.
pub(crate) struct Machine {
    pub(crate) groups: Groups,
    /// Running units by index (`None`: down).
    units: Vec<Option<Arc<dyn IommuUnit>>>,
    state: spin::Mutex<State>,
}

impl Machine {
    pub(crate) fn new(groups: Groups, units: Vec<Option<Arc<dyn IommuUnit>>>) -> Self {
        Self { groups, units, state: spin::Mutex::new(State { next_guest: 1, ..Default::default() }) }
    }

    /// A guest number no other guest has.
    pub(crate) fn new_guest(&self) -> GuestId {
        let mut s = self.state.lock();
        let id = GuestId(s.next_guest);
        s.next_guest += 1;
        s.queues.insert(Owner::Guest(id), Queue::default());
        id
    }

    /// Forgets a guest's queue (its groups must be released).
    pub(crate) fn drop_guest(&self, id: GuestId) {
        self.state.lock().queues.remove(&Owner::Guest(id));
    }

    /// A number for a new DMA view (its [`Holder::View`]).
    pub(crate) fn new_view(&self) -> u32 {
        let mut s = self.state.lock();
        s.next_view += 1;
        s.next_view
    }

    /// One more hold of `f`'s group by `owner`, through `holder`: claims
    /// the group if nobody owns it. Refused (nothing changes) when another
    /// owner has the group, or another holder of the same owner has `f`.
    pub(crate) fn hold(&self, f: Function, group: GroupId, owner: Owner, holder: Holder) -> Result<(), Taken> {
        let mut s = self.state.lock();
        let held = s.holds.get(&group).and_then(|h| h.iter().find(|x| x.0 == f).map(|x| x.1));
        match held {
            Some(by) if by == holder => return Ok(()),
            Some(_) => return Err(Taken { group, owner: s.owners.owner(group).unwrap_or(owner) }),
            None => {}
        }
        s.owners.claim(group, owner)?;
        s.holds.entry(group).or_default().push((f, holder));
        Ok(())
    }

    /// Whether `holder` holds `f`.
    pub(crate) fn holds(&self, f: Function, group: GroupId, holder: Holder) -> bool {
        self.state.lock().holds.get(&group).is_some_and(|h| h.contains(&(f, holder)))
    }

    /// Drops `holder`'s hold of `f` (another holder's hold of it stays);
    /// returns whether the group is free now (nothing of `owner` holds it
    /// any more).
    pub(crate) fn unhold(&self, f: Function, group: GroupId, owner: Owner, holder: Holder) -> bool {
        let mut s = self.state.lock();
        if s.owners.owner(group) != Some(owner) {
            return false;
        }
        let empty = match s.holds.get_mut(&group) {
            Some(h) => {
                h.retain(|x| *x != (f, holder));
                h.is_empty()
            }
            None => true,
        };
        if empty {
            s.holds.remove(&group);
            s.owners.release(group, owner);
        }
        empty
    }

    /// Functions holding `group` now.
    pub(crate) fn holds_left(&self, group: GroupId) -> usize {
        self.state.lock().holds.get(&group).map_or(0, |h| h.len())
    }

    /// The owner of `group`.
    pub(crate) fn owner(&self, group: GroupId) -> Option<Owner> {
        self.state.lock().owners.owner(group)
    }

    /// Reads new faults from every running unit and routes each to the
    /// owner of its group (faults of groups nobody owns go to the host's
    /// stream); counts recording overflows as lost for every owner with a
    /// group on that unit.
    pub(crate) fn route_faults(&self) {
        let mut polled: Vec<(usize, Vec<DmaFault>, u64)> = Vec::new();
        for (i, u) in self.units.iter().enumerate() {
            if let Some(u) = u {
                let new = u.poll_faults();
                let (_, overflows) = u.fault_log();
                polled.push((i, new, overflows));
            }
        }
        let mut s = self.state.lock();
        for (unit, new, overflows) in polled {
            let seen = s.overflows.insert(unit, overflows).unwrap_or(0);
            if overflows > seen {
                let lost = overflows - seen;
                let owners: Vec<Owner> = self
                    .groups
                    .all()
                    .iter()
                    .filter(|g| g.unit == unit)
                    .filter_map(|g| s.owners.owner(g.id))
                    .chain(core::iter::once(Owner::Host))
                    .collect();
                for o in owners {
                    s.queues.entry(o).or_default().lost += lost;
                }
            }
            for fault in new {
                let Some(g) = self.groups.by_requester(unit, fault.requester_id) else {
                    // A requester id no function was enumerated under.
                    push(s.queues.entry(Owner::Host).or_default(), unit, GroupId(u32::MAX), fault);
                    continue;
                };
                let owner = match s.owners.owner(g.id) {
                    Some(Owner::Guest(id)) if s.queues.contains_key(&Owner::Guest(id)) => Owner::Guest(id),
                    _ => Owner::Host,
                };
                let id = g.id;
                push(s.queues.entry(owner).or_default(), unit, id, fault);
            }
        }
    }

    /// Takes `owner`'s unread faults and lost count.
    pub(crate) fn take_faults(&self, owner: Owner) -> FaultBatch<RoutedFault> {
        let mut s = self.state.lock();
        let q = s.queues.entry(owner).or_default();
        FaultBatch { faults: q.faults.drain(..).collect(), lost: core::mem::take(&mut q.lost) }
    }
}

fn push(q: &mut Queue, unit: usize, group: GroupId, fault: DmaFault) {
    if q.faults.len() >= FAULT_QUEUE {
        q.lost += 1;
    } else {
        q.faults.push_back(RoutedFault { unit, group, fault });
    }
}

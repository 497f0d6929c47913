//! Machine-wide ownership: isolation groups (functions whose DMA the IOMMU
//! cannot tell apart) and who owns each group: the host, one guest, or
//! nobody (blocked).
//!
//! Rules (host-tested below):
//! * Functions that reach their unit under the same requester id (behind a
//!   PCIe-to-PCI or conventional PCI bridge, or aliased by the IVRS) are one
//!   group: one context or device table entry serves them all.
//! * Functions of one multi-function device form one group unless every
//!   one of them has an ACS capability: without ACS they may reach each
//!   other peer to peer, bypassing the IOMMU.
//! * A group has one owner at a time and is never split: claiming a group
//!   another owner holds fails with that owner named, and changes nothing.
//!
//! Plain data in and out; the state sits behind `Iommus`' lock.

use crate::error::Function;
use crate::topology::Assignment;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::fmt;
use portcullis_iommu::RequesterRef;

/// A guest, as the machine-wide ownership knows it (numbered from 1 as
/// guests are created).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestId(pub u32);

impl fmt::Display for GuestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest {}", self.0)
    }
}

/// Who a group's DMA belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Owner {
    /// The hypervisor itself (a host domain, or pass-through).
    Host,
    /// One guest.
    Guest(GuestId),
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host => write!(f, "the host"),
            Self::Guest(g) => write!(f, "{g}"),
        }
    }
}

/// An isolation group's number (its index in [`Groups::all`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u32);

/// Functions the IOMMU cannot isolate from each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Its number.
    pub id: GroupId,
    /// The unit translating it (index in `Iommus::units`).
    pub unit: usize,
    /// The requester ids its DMA arrives with (one, unless an ACS-less
    /// multi-function device joined groups of several ids).
    pub requester_ids: Vec<u16>,
    /// Its functions, in order.
    pub functions: Vec<Function>,
}

impl Group {
    /// Where each of its requester ids is translated.
    pub fn requesters(&self) -> impl Iterator<Item = RequesterRef> + '_ {
        self.requester_ids.iter().map(|&r| RequesterRef { unit: self.unit as u16, requester_id: r })
    }
}

/// Every isolation group of the machine, and the group of each function.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Groups {
    groups: Vec<Group>,
    of: BTreeMap<Function, GroupId>,
}

impl Groups {
    /// The groups of the translated functions `assignments` (function ->
    /// unit and requester id); `acs` says which functions have an ACS
    /// capability.
    pub fn build(assignments: &[(Function, Assignment)], acs: impl Fn(Function) -> bool) -> Self {
        // Union-find over the functions, by index.
        let n = assignments.len();
        let mut parent: Vec<usize> = (0..n).collect();
        fn find(parent: &mut [usize], mut i: usize) -> usize {
            while parent[i] != i {
                parent[i] = parent[parent[i]];
                i = parent[i];
            }
            i
        }
        let union = |parent: &mut Vec<usize>, a: usize, b: usize| {
            let (ra, rb) = (find(parent, a), find(parent, b));
            if ra != rb {
                parent[ra.max(rb)] = ra.min(rb);
            }
        };
        // Same unit and requester id: one entry serves them all.
        let mut by_rid: BTreeMap<(usize, u16), usize> = BTreeMap::new();
        // Same device (segment, bus, device number): the functions of one
        // multi-function device.
        let mut by_device: BTreeMap<(u16, u8, u8), Vec<usize>> = BTreeMap::new();
        for (i, (f, a)) in assignments.iter().enumerate() {
            match by_rid.get(&(a.unit, a.requester_id)) {
                Some(&j) => union(&mut parent, i, j),
                None => {
                    by_rid.insert((a.unit, a.requester_id), i);
                }
            }
            by_device.entry((f.segment, f.bdf.bus, f.bdf.device)).or_default().push(i);
        }
        for members in by_device.values() {
            if members.len() > 1 && !members.iter().all(|&i| acs(assignments[i].0)) {
                for w in members.windows(2) {
                    union(&mut parent, w[0], w[1]);
                }
            }
        }
        let mut roots: BTreeMap<usize, GroupId> = BTreeMap::new();
        let mut out = Self::default();
        for (i, (f, a)) in assignments.iter().enumerate() {
            let r = find(&mut parent, i);
            let id = *roots.entry(r).or_insert_with(|| {
                let id = GroupId(out.groups.len() as u32);
                out.groups.push(Group { id, unit: a.unit, requester_ids: Vec::new(), functions: Vec::new() });
                id
            });
            let g = &mut out.groups[id.0 as usize];
            g.functions.push(*f);
            if !g.requester_ids.contains(&a.requester_id) {
                g.requester_ids.push(a.requester_id);
            }
            out.of.insert(*f, id);
        }
        out
    }

    /// Every group.
    pub fn all(&self) -> &[Group] {
        &self.groups
    }

    /// The group of `f` (`None`: no unit translates it).
    pub fn of(&self, f: Function) -> Option<&Group> {
        self.of.get(&f).map(|id| &self.groups[id.0 as usize])
    }

    /// Group `id`.
    pub fn get(&self, id: GroupId) -> Option<&Group> {
        self.groups.get(id.0 as usize)
    }

    /// The group whose DMA arrives at `unit` as `requester_id`.
    pub fn by_requester(&self, unit: usize, requester_id: u16) -> Option<&Group> {
        self.groups.iter().find(|g| g.unit == unit && g.requester_ids.contains(&requester_id))
    }
}

/// Who owns which group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owners {
    owners: BTreeMap<GroupId, Owner>,
}

/// A group is owned by someone else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// The group.
    pub group: GroupId,
    /// Its owner.
    pub owner: Owner,
}

impl Owners {
    /// The owner of `group` (`None`: blocked, nobody's).
    pub fn owner(&self, group: GroupId) -> Option<Owner> {
        self.owners.get(&group).copied()
    }

    /// Gives `group` to `owner`. Claiming a group one already owns
    /// succeeds and changes nothing; a group someone else owns is refused.
    pub fn claim(&mut self, group: GroupId, owner: Owner) -> Result<(), Taken> {
        match self.owners.get(&group) {
            Some(&o) if o != owner => Err(Taken { group, owner: o }),
            _ => {
                self.owners.insert(group, owner);
                Ok(())
            }
        }
    }

    /// Gives `group` up (it must be `owner`'s; others' claims stay).
    pub fn release(&mut self, group: GroupId, owner: Owner) {
        if self.owners.get(&group) == Some(&owner) {
            self.owners.remove(&group);
        }
    }

    /// Every group `owner` holds.
    pub fn held_by(&self, owner: Owner) -> impl Iterator<Item = GroupId> + '_ {
        self.owners.iter().filter(move |(_, o)| **o == owner).map(|(g, _)| *g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bdf;

    fn f(bus: u8, device: u8, function: u8) -> Function {
        Function { segment: 0, bdf: Bdf::new(bus, device, function) }
    }

    fn a(unit: usize, requester_id: u16) -> Assignment {
        Assignment { unit, requester_id, alias_bridge: None }
    }

    #[test]
    fn shared_requester_ids_and_acs_less_multifunction_devices_group() {
        let list = [
            (f(0, 1, 0), a(0, 0x0008)),
            // Two functions behind a PCIe-to-PCI bridge: both arrive as 02:00.0.
            (f(2, 1, 0), a(0, 0x0200)),
            (f(2, 2, 0), a(0, 0x0200)),
            // A multi-function device without ACS on one function.
            (f(3, 0, 0), a(0, 0x0300)),
            (f(3, 0, 1), a(0, 0x0301)),
            // A multi-function device whose functions all have ACS.
            (f(4, 0, 0), a(0, 0x0400)),
            (f(4, 0, 1), a(0, 0x0401)),
            // The same requester id on another unit is another group.
            (f(5, 0, 0), a(1, 0x0200)),
        ];
        let g = Groups::build(&list, |x| x.bdf.bus == 4 || x == f(3, 0, 0));
        let id = |x| g.of(x).unwrap().id;
        assert_eq!(g.all().len(), 6);
        assert_eq!(id(f(2, 1, 0)), id(f(2, 2, 0)), "one requester id, one group");
        assert_eq!(g.of(f(2, 1, 0)).unwrap().requester_ids, [0x0200]);
        assert_eq!(id(f(3, 0, 0)), id(f(3, 0, 1)), "ACS missing on one function joins them");
        assert_eq!(g.of(f(3, 0, 0)).unwrap().requester_ids, [0x0300, 0x0301]);
        assert_ne!(id(f(4, 0, 0)), id(f(4, 0, 1)), "ACS everywhere keeps them apart");
        assert_ne!(id(f(5, 0, 0)), id(f(2, 1, 0)), "another unit");
        assert_eq!(g.by_requester(0, 0x0301).unwrap().id, id(f(3, 0, 0)));
        assert!(g.of(f(9, 0, 0)).is_none());
    }

    #[test]
    fn a_group_has_one_owner_and_is_never_taken_over() {
        let mut o = Owners::default();
        let (g1, g2) = (GroupId(1), GroupId(2));
        let (a, b) = (Owner::Guest(GuestId(1)), Owner::Guest(GuestId(2)));
        o.claim(g1, a).unwrap();
        o.claim(g1, a).unwrap();
        assert_eq!(o.claim(g1, b), Err(Taken { group: g1, owner: a }));
        assert_eq!(o.claim(g1, Owner::Host), Err(Taken { group: g1, owner: a }));
        o.claim(g2, Owner::Host).unwrap();
        o.release(g1, b);
        assert_eq!(o.owner(g1), Some(a), "only the owner releases");
        o.release(g1, a);
        assert_eq!(o.owner(g1), None);
        o.claim(g1, b).unwrap();
        assert_eq!(o.held_by(b).collect::<Vec<_>>(), [g1]);
        assert_eq!(o.held_by(Owner::Host).collect::<Vec<_>>(), [g2]);
    }
}

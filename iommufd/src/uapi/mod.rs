//! The iommufd and VFIO-type1 user ABI: ioctl numbers, argument structs and
//! the generic size/extensibility rules, as Linux 6.12 applies them (plus
//! IOAS_MAP_FILE of 6.13 and IOAS_CHANGE_PROCESS of 6.14, served too).
//!
//! Everything here is written from the published ABI facts (numbers, field
//! offsets, errno rules) of `include/uapi/linux/iommufd.h`,
//! `include/uapi/linux/vfio.h`, `drivers/iommu/iommufd/iommufd_test.h` and
//! the behaviour of `drivers/iommu/iommufd/main.c` / `vfio_compat.c`; no code
//! or comment text is taken from there.
//!
//! By concern:
//!
//! * [`layout`]: how a struct is modelled (little-endian fields at the
//!   header's offsets, checked against the Rust layout at compile time) and
//!   the per-struct field lists;
//! * `structs`: the iommufd argument structs and their flag values;
//! * `selftest`: `IOMMU_TEST_CMD`, its ops and its union members;
//! * [`vfio`]: the VFIO type1 container ioctls iommufd emulates;
//! * `table`: ioctl numbers and the command table (names, minimum and
//!   full sizes);
//! * `rules`: the generic path of an ioctl (size field, `EINVAL` below the
//!   minimum, `E2BIG` for a non-zero tail, copy-out) and each command's
//!   check order;
//! * `fields`: each command's argument as named fields (offset, size, and
//!   whether it holds an object id), for tools that decode recorded calls.
//!
//! Everything is re-exported here: `uapi::IommuIoasMap`,
//! `uapi::take_command`, `uapi::IOMMU_TEST_CMD`, ... (VFIO items stay under
//! `uapi::vfio`).

#[macro_use]
pub mod layout;
mod fields;
mod rules;
mod selftest;
mod structs;
mod table;
pub mod vfio;

pub use fields::*;
pub use layout::{FieldLayout, LeField, UapiStruct};
pub use rules::*;
pub use selftest::*;
pub use structs::*;
pub use table::*;

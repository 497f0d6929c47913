//! The selftest hooks: a mock IOMMU domain and the test commands of Linux's
//! `IOMMU_TEST_CMD`, so Linux's selftest cases can be written against our
//! dispatcher with the same inputs and expected results.

pub mod cmd;
pub mod described;
pub mod mock;

pub use mock::MockDomain;

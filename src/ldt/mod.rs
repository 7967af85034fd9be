//! LDT proper: stage-1 statistics, the partition into stable and unstable sets, DPU
//! coefficients and folds, and the composite network.

pub mod composite;
pub mod dpu;
pub mod lag;
pub mod partition;
pub mod stage1;
pub mod stats;

//! LDT proper, as pure functions of their inputs: stage-1 statistics accumulators and
//! scores, the partition into stable and unstable sets with the DPU coefficients, the
//! DPU warm-up and half-lives, the lag report, the composite mapping, and the search of
//! `auto` settings. It imports neither the training loops nor the counterpart buffer
//! (checked by tests/module_graph.rs); those use it.

pub mod composite;
pub mod dpu;
pub mod lag;
pub mod partition;
pub mod search;
pub mod stats;

//! LDT proper: stage-1 statistics, the partition into stable and unstable sets, DPU
//! coefficients and folds, and the composite network.

//! The composite network, the only one kept: stable layers from AM's frozen copy
//! `~A^S`, unstable layers from PM's frozen copy `~P^U`, buffers from PM. Same names
//! and shapes as the original architecture.

use super::partition::Partition;
use candle_core::Tensor;

/// The composite's parameter tensors (model order) from PM's and AM's parameters.
pub fn params(partition: &Partition, pm: &[Tensor], am: &[Tensor]) -> Vec<Tensor> {
    (0..pm.len())
        .map(|i| {
            if partition.is_stable(i) {
                am[i].clone()
            } else {
                pm[i].clone()
            }
        })
        .collect()
}

//! The composite network, the only one kept: stable layers from AM's frozen copy
//! `~A^S`, unstable layers from PM's frozen copy `~P^U`, buffers from PM. Same names
//! and shapes as the original architecture.

use super::partition::Partition;
use crate::model::{NetState, Network};
use candle_core::Tensor;

/// The composite's parameter tensors (model order), detached.
pub fn params(partition: &Partition, pm: &NetState, am: &NetState) -> Vec<Tensor> {
    (0..pm.params.len())
        .map(|i| {
            let src = if partition.is_stable(i) {
                &am.params[i]
            } else {
                &pm.params[i]
            };
            src.as_tensor().detach()
        })
        .collect()
}

/// The composite as named tensors (parameters then PM's buffers), for saving.
pub fn named(
    net: &dyn Network,
    partition: &Partition,
    pm: &NetState,
    am: &NetState,
) -> Vec<(String, Tensor)> {
    let p = params(partition, pm, am);
    net.params()
        .iter()
        .map(|s| s.name.clone())
        .zip(p)
        .chain(
            net.buffers()
                .iter()
                .map(|b| b.name.clone())
                .zip(pm.buffers.iter().cloned()),
        )
        .collect()
}

//! `mlp`: flatten -> (`fc{i}` Linear -> ReLU)* -> last `fc` Linear (the head).

use super::{group_blocks, layers, BlockSpec, BufferSpec, Init, Mode, Network, TensorSpec};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Multi-layer perceptron with PyTorch names `fc1`, `fc2`, ...
pub struct Mlp {
    input: [usize; 3],
    classes: usize,
    params: Vec<TensorSpec>,
    /// One block per Linear (with its ReLU).
    blocks: Vec<BlockSpec>,
}

impl Mlp {
    /// An MLP with the given hidden widths (the fixtures use `[128, 64]`).
    pub fn new(input: [usize; 3], hidden: &[usize], classes: usize) -> Result<Self> {
        if hidden.contains(&0) {
            bail!("config key `model.hidden`: widths must be positive, got {hidden:?}");
        }
        let mut dims = vec![input.iter().product::<usize>()];
        dims.extend_from_slice(hidden);
        dims.push(classes);
        let mut params = Vec::new();
        for (i, w) in dims.windows(2).enumerate() {
            let (fan_in, out) = (w[0], w[1]);
            params.push(TensorSpec {
                name: format!("fc{}.weight", i + 1),
                shape: vec![out, fan_in],
                init: Init::FanIn(fan_in),
            });
            params.push(TensorSpec {
                name: format!("fc{}.bias", i + 1),
                shape: vec![out],
                init: Init::FanIn(fan_in),
            });
        }
        let blocks = group_blocks(&params, &[], |n| n.split('.').next().unwrap_or(n).into())?;
        Ok(Mlp {
            input,
            classes,
            params,
            blocks,
        })
    }
}

impl Network for Mlp {
    fn arch(&self) -> &str {
        "mlp"
    }
    fn params(&self) -> &[TensorSpec] {
        &self.params
    }
    fn buffers(&self) -> &[BufferSpec] {
        &[]
    }
    fn head_prefixes(&self) -> Vec<String> {
        vec![format!("fc{}.", self.params.len() / 2)]
    }
    fn input_shape(&self) -> [usize; 3] {
        self.input
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn blocks(&self) -> &[BlockSpec] {
        &self.blocks
    }
    fn forward_block(
        &self,
        k: usize,
        p: &[Tensor],
        _b: &mut [Tensor],
        x: &Tensor,
        _mode: Mode,
    ) -> Result<Tensor> {
        let h = if k == 0 {
            x.flatten_from(1)?
        } else {
            x.clone()
        };
        let h = layers::linear(&h, &p[0], Some(&p[1]))?;
        if k + 1 < self.blocks.len() {
            layers::relu(&h)
        } else {
            Ok(h)
        }
    }
}

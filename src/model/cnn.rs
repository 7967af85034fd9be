//! `cnn` / `cnn_bn`: (`conv{i}` 3x3 pad 1 [-> `bn{i}`] -> ReLU -> max-pool 2)* ->
//! flatten (C,H,W) -> `fc1` -> ReLU -> `fc2` (the head).

use super::{group_blocks, layers, BlockSpec, BufferSpec, Init, Mode, Network, TensorSpec};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Small convolutional network; `bn` adds BatchNorm2d after each convolution.
pub struct Cnn {
    input: [usize; 3],
    classes: usize,
    convs: usize,
    bn: bool,
    params: Vec<TensorSpec>,
    buffers: Vec<BufferSpec>,
    /// One block per convolution stage (`conv{k}`, `bn{k}`), then `fc1`, then `fc2`.
    blocks: Vec<BlockSpec>,
}

impl Cnn {
    /// A CNN with the given convolution channels (fixtures: `[16, 32]`, `fc_hidden` 64).
    pub fn new(
        input: [usize; 3],
        channels: &[usize],
        fc_hidden: usize,
        classes: usize,
        bn: bool,
    ) -> Result<Self> {
        if channels.is_empty() || channels.contains(&0) || fc_hidden == 0 {
            bail!("config keys `model.channels` / `model.fc_hidden`: need at least one positive channel count and a positive width");
        }
        let (mut c, mut h, mut w) = (input[0], input[1], input[2]);
        let mut params = Vec::new();
        let mut buffers = Vec::new();
        for (i, &o) in channels.iter().enumerate() {
            let k = i + 1;
            let fan_in = c * 9;
            params.push(TensorSpec {
                name: format!("conv{k}.weight"),
                shape: vec![o, c, 3, 3],
                init: Init::FanIn(fan_in),
            });
            if !bn {
                params.push(TensorSpec {
                    name: format!("conv{k}.bias"),
                    shape: vec![o],
                    init: Init::FanIn(fan_in),
                });
            } else {
                params.push(TensorSpec {
                    name: format!("bn{k}.weight"),
                    shape: vec![o],
                    init: Init::Ones,
                });
                params.push(TensorSpec {
                    name: format!("bn{k}.bias"),
                    shape: vec![o],
                    init: Init::Zeros,
                });
                for (n, init) in [("running_mean", Init::Zeros), ("running_var", Init::Ones)] {
                    buffers.push(BufferSpec {
                        name: format!("bn{k}.{n}"),
                        shape: vec![o],
                        dtype: DType::F32,
                        init,
                    });
                }
                buffers.push(BufferSpec {
                    name: format!("bn{k}.num_batches_tracked"),
                    shape: vec![],
                    dtype: DType::I64,
                    init: Init::Zeros,
                });
            }
            c = o;
            h /= 2;
            w /= 2;
            if h == 0 || w == 0 {
                bail!("config key `model.channels`: {} pooling stages shrink a {}x{} input to nothing", channels.len(), input[1], input[2]);
            }
        }
        let flat = c * h * w;
        for (name, fan_in, out) in [("fc1", flat, fc_hidden), ("fc2", fc_hidden, classes)] {
            params.push(TensorSpec {
                name: format!("{name}.weight"),
                shape: vec![out, fan_in],
                init: Init::FanIn(fan_in),
            });
            params.push(TensorSpec {
                name: format!("{name}.bias"),
                shape: vec![out],
                init: Init::FanIn(fan_in),
            });
        }
        // `conv3` and `bn3` are stage 3; `fc1`, `fc2` blocks of their own.
        let blocks = group_blocks(&params, &buffers, |n| {
            let layer = n.split('.').next().unwrap_or(n);
            layer
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .to_string()
                + if layer.starts_with("fc") { "fc" } else { "" }
        })?;
        Ok(Cnn {
            input,
            classes,
            convs: channels.len(),
            bn,
            params,
            buffers,
            blocks,
        })
    }
}

impl Network for Cnn {
    fn arch(&self) -> &str {
        if self.bn {
            "cnn_bn"
        } else {
            "cnn"
        }
    }
    fn params(&self) -> &[TensorSpec] {
        &self.params
    }
    fn buffers(&self) -> &[BufferSpec] {
        &self.buffers
    }
    fn head_prefixes(&self) -> Vec<String> {
        vec!["fc2.".into()]
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
        b: &mut [Tensor],
        x: &Tensor,
        mode: Mode,
    ) -> Result<Tensor> {
        if k == self.convs {
            let h = x.flatten_from(1)?;
            return layers::relu(&layers::linear(&h, &p[0], Some(&p[1]))?);
        }
        if k > self.convs {
            return layers::linear(x, &p[0], Some(&p[1]));
        }
        let h = if self.bn {
            let h = layers::conv2d(x, &p[0], None, 1, 1)?;
            let [mean, var, count] = b else {
                bail!("cnn_bn: BatchNorm buffers out of step with the specs");
            };
            let buf = layers::BnBuffers { mean, var, count };
            layers::batch_norm2d_relu(&h, &p[1], &p[2], buf, mode)?
        } else {
            layers::relu(&layers::conv2d(x, &p[0], Some(&p[1]), 1, 1)?)?
        };
        layers::max_pool2d(&h, 2, 2, 0)
    }
}

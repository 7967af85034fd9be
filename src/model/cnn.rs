//! `cnn` / `cnn_bn`: (`conv{i}` 3x3 pad 1 [-> `bn{i}`] -> ReLU -> max-pool 2)* ->
//! flatten (C,H,W) -> `fc1` -> ReLU -> `fc2` (the head).

use super::{layers, BufferSpec, Init, Mode, Network, TensorSpec};
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
        Ok(Cnn {
            input,
            classes,
            convs: channels.len(),
            bn,
            params,
            buffers,
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
    fn forward(&self, p: &[Tensor], b: &mut [Tensor], x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut h = x.clone();
        let mut pi = 0;
        for i in 0..self.convs {
            if self.bn {
                h = layers::conv2d(&h, &p[pi], None, 1, 1)?;
                let (mean, rest) = b[3 * i..3 * i + 3].split_at_mut(1);
                let (var, count) = rest.split_at_mut(1);
                h = layers::batch_norm2d(
                    &h,
                    &p[pi + 1],
                    &p[pi + 2],
                    layers::BnBuffers {
                        mean: &mut mean[0],
                        var: &mut var[0],
                        count: &mut count[0],
                    },
                    mode,
                )?;
                pi += 3;
            } else {
                h = layers::conv2d(&h, &p[pi], Some(&p[pi + 1]), 1, 1)?;
                pi += 2;
            }
            h = layers::max_pool2d(&layers::relu(&h)?, 2, 2, 0)?;
        }
        let h = h.flatten_from(1)?;
        let h = layers::relu(&layers::linear(&h, &p[pi], Some(&p[pi + 1]))?)?;
        layers::linear(&h, &p[pi + 2], Some(&p[pi + 3]))
    }
}

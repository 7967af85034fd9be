//! `resnet18` / `resnet34` / `resnet50` / `resnet101`: torchvision's ResNet with its exact
//! parameter and buffer names, order and layouts.
//!
//! `conv1` 7x7/2 pad 3 -> `bn1` -> ReLU -> max-pool 3x3/2 pad 1 -> `layer1..4` -> global
//! average pool -> `fc` (the head). BasicBlock (18/34): `conv1` 3x3/s -> `bn1` -> ReLU ->
//! `conv2` 3x3 -> `bn2`; Bottleneck (50/101, expansion 4, torchvision v1.5: the stride
//! sits on the 3x3): `conv1` 1x1 -> `bn1` -> ReLU -> `conv2` 3x3/s -> `bn2` -> ReLU ->
//! `conv3` 1x1 -> `bn3`. The shortcut is the input, or `downsample.0` (1x1/s conv) ->
//! `downsample.1` (BatchNorm) when the stride or the width changes; add, then ReLU.

use super::{
    group_blocks, layers, BlockSpec, BufferSpec, Init, Mode, Network, Segment, TensorSpec,
};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// One residual block of the plan.
#[derive(Clone, Copy, Debug)]
struct Block {
    /// Stride of the block (on `conv1` for BasicBlock, `conv2` for Bottleneck).
    stride: usize,
    /// Whether the shortcut is `downsample.0/1`.
    downsample: bool,
}

/// torchvision ResNet (BasicBlock or Bottleneck).
pub struct ResNet {
    arch: String,
    input: [usize; 3],
    classes: usize,
    bottleneck: bool,
    /// The residual blocks, in order.
    residual: Vec<Block>,
    params: Vec<TensorSpec>,
    buffers: Vec<BufferSpec>,
    /// The forward's blocks: the stem, each residual block, the head.
    blocks: Vec<BlockSpec>,
}

/// Appends the specs of a bias-free convolution `[out, inp, k, k]` (torchvision init:
/// kaiming_normal, fan_out, relu).
fn conv(params: &mut Vec<TensorSpec>, name: &str, out: usize, inp: usize, k: usize) {
    params.push(TensorSpec {
        name: format!("{name}.weight"),
        shape: vec![out, inp, k, k],
        init: Init::Normal((2.0 / (out * k * k) as f32).sqrt()),
    });
}

/// Appends the specs of a BatchNorm2d over `c` channels (weight 1, bias 0; buffers
/// running_mean 0, running_var 1, num_batches_tracked 0).
fn bn(params: &mut Vec<TensorSpec>, buffers: &mut Vec<BufferSpec>, name: &str, c: usize) {
    for (p, init) in [("weight", Init::Ones), ("bias", Init::Zeros)] {
        params.push(TensorSpec {
            name: format!("{name}.{p}"),
            shape: vec![c],
            init,
        });
    }
    for (b, init) in [("running_mean", Init::Zeros), ("running_var", Init::Ones)] {
        buffers.push(BufferSpec {
            name: format!("{name}.{b}"),
            shape: vec![c],
            dtype: DType::F32,
            init,
        });
    }
    buffers.push(BufferSpec {
        name: format!("{name}.num_batches_tracked"),
        shape: vec![],
        dtype: DType::I64,
        init: Init::Zeros,
    });
}

impl ResNet {
    /// `arch` is `resnet18`, `resnet34`, `resnet50` or `resnet101`; any input size (the
    /// pooling is global), `input[0]` input channels.
    pub fn new(arch: &str, input: [usize; 3], classes: usize) -> Result<Self> {
        let (bottleneck, counts) = match arch {
            "resnet18" => (false, [2, 2, 2, 2]),
            "resnet34" => (false, [3, 4, 6, 3]),
            "resnet50" => (true, [3, 4, 6, 3]),
            "resnet101" => (true, [3, 4, 23, 3]),
            other => bail!("config key `model.arch`: `{other}` is not a ResNet"),
        };
        if input.contains(&0) || classes == 0 {
            bail!("resnet: input {input:?} and {classes} classes must be non-empty");
        }
        let expansion = if bottleneck { 4 } else { 1 };
        let mut params = Vec::new();
        let mut buffers = Vec::new();
        let mut blocks = Vec::new();
        conv(&mut params, "conv1", 64, input[0], 7);
        bn(&mut params, &mut buffers, "bn1", 64);
        let mut inplanes = 64;
        for (li, &count) in counts.iter().enumerate() {
            let planes = 64 << li;
            for bi in 0..count {
                let stride = if li > 0 && bi == 0 { 2 } else { 1 };
                let downsample = stride != 1 || inplanes != planes * expansion;
                let p = format!("layer{}.{bi}", li + 1);
                if bottleneck {
                    conv(&mut params, &format!("{p}.conv1"), planes, inplanes, 1);
                    bn(&mut params, &mut buffers, &format!("{p}.bn1"), planes);
                    conv(&mut params, &format!("{p}.conv2"), planes, planes, 3);
                    bn(&mut params, &mut buffers, &format!("{p}.bn2"), planes);
                    conv(&mut params, &format!("{p}.conv3"), planes * 4, planes, 1);
                    bn(&mut params, &mut buffers, &format!("{p}.bn3"), planes * 4);
                } else {
                    conv(&mut params, &format!("{p}.conv1"), planes, inplanes, 3);
                    bn(&mut params, &mut buffers, &format!("{p}.bn1"), planes);
                    conv(&mut params, &format!("{p}.conv2"), planes, planes, 3);
                    bn(&mut params, &mut buffers, &format!("{p}.bn2"), planes);
                }
                if downsample {
                    let out = planes * expansion;
                    conv(&mut params, &format!("{p}.downsample.0"), out, inplanes, 1);
                    bn(&mut params, &mut buffers, &format!("{p}.downsample.1"), out);
                }
                inplanes = planes * expansion;
                blocks.push(Block { stride, downsample });
            }
        }
        params.push(TensorSpec {
            name: "fc.weight".into(),
            shape: vec![classes, inplanes],
            init: Init::FanIn(inplanes),
        });
        params.push(TensorSpec {
            name: "fc.bias".into(),
            shape: vec![classes],
            init: Init::FanIn(inplanes),
        });
        let spans = group_blocks(&params, &buffers, |n| {
            if n.starts_with("layer") {
                n.split('.').take(2).collect::<Vec<_>>().join(".")
            } else if n.starts_with("fc.") {
                "fc".into()
            } else {
                "stem".into()
            }
        })?;
        Ok(ResNet {
            arch: arch.into(),
            input,
            classes,
            bottleneck,
            residual: blocks,
            params,
            buffers,
            blocks: spans,
        })
    }
}

/// Walks the parameters and buffers in spec order during a forward.
struct Cursor<'a> {
    params: &'a [Tensor],
    buffers: &'a mut [Tensor],
    p: usize,
    b: usize,
    mode: Mode,
}

impl Cursor<'_> {
    /// The next convolution (no bias) applied to `x`.
    fn conv(&mut self, x: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
        let w = &self.params[self.p];
        self.p += 1;
        layers::conv2d(x, w, None, stride, padding)
    }

    /// The next BatchNorm2d applied to `x` (its buffers updated in `Mode::Train`), with
    /// `relu` followed by a ReLU (one op: [`layers::batch_norm2d_relu`]).
    fn bn(&mut self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let (w, b) = (&self.params[self.p], &self.params[self.p + 1]);
        self.p += 2;
        let [mean, var, count] = &mut self.buffers[self.b..self.b + 3] else {
            bail!("resnet: BatchNorm buffers out of step with the specs");
        };
        self.b += 3;
        let buf = layers::BnBuffers { mean, var, count };
        match relu {
            true => layers::batch_norm2d_relu(x, w, b, buf, self.mode),
            false => layers::batch_norm2d(x, w, b, buf, self.mode),
        }
    }
}

impl Network for ResNet {
    fn arch(&self) -> &str {
        &self.arch
    }
    fn params(&self) -> &[TensorSpec] {
        &self.params
    }
    fn buffers(&self) -> &[BufferSpec] {
        &self.buffers
    }
    fn head_prefixes(&self) -> Vec<String> {
        vec!["fc.".into()]
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
        super::fold_segments(self, k, p, b, x, mode)
    }

    /// The stem and the head are one segment each. A residual block is one segment per
    /// convolution unit (conv -> BatchNorm, ReLU but on the last), carrying the block's
    /// input beside; the last unit adds the shortcut and applies the ReLU, or with
    /// `downsample` the shortcut's own unit does (its BatchNorm is as large as the last
    /// unit's, so apart they do not meet in one backward).
    fn segments(&self, k: usize) -> Vec<Segment> {
        let units = match self.residual.get(k.wrapping_sub(1)) {
            Some(blk) => usize::from(self.bottleneck) + 2 + usize::from(blk.downsample),
            None => return vec![Segment::whole(&self.blocks[k])],
        };
        // A unit is one convolution (1 parameter) and one BatchNorm (2 parameters and
        // 3 buffers).
        (0..units)
            .map(|u| Segment {
                params: 3 * u..3 * u + 3,
                buffers: 3 * u..3 * u + 3,
            })
            .collect()
    }

    fn forward_segment(
        &self,
        k: usize,
        j: usize,
        p: &[Tensor],
        b: &mut [Tensor],
        carried: &[Tensor],
        mode: Mode,
    ) -> Result<Vec<Tensor>> {
        let mut cur = Cursor {
            params: p,
            buffers: b,
            p: 0,
            b: 0,
            mode,
        };
        let Some(blk) = k.checked_sub(1).and_then(|r| self.residual.get(r)) else {
            let [x] = carried else {
                bail!("resnet: block {k} takes one tensor");
            };
            if k == 0 {
                let h = cur.conv(x, 2, 3)?;
                let h = cur.bn(&h, true)?;
                return Ok(vec![layers::max_pool2d(&h, 3, 2, 1)?]);
            }
            let pooled = x.mean((2, 3))?;
            return Ok(vec![layers::linear(&pooled, &p[0], Some(&p[1]))?]);
        };
        // The main path's units: (stride, padding) of each convolution.
        let main: &[(usize, usize)] = match self.bottleneck {
            true => &[(1, 0), (blk.stride, 1), (1, 0)],
            false => &[(blk.stride, 1), (1, 1)],
        };
        let last = main.len() - 1;
        match (j, carried) {
            // The shortcut's unit: the block's output.
            (j, [a, x]) if j == main.len() && blk.downsample => {
                let s = cur.conv(x, blk.stride, 0)?;
                let s = cur.bn(&s, false)?;
                Ok(vec![layers::add_relu(a, &s)?])
            }
            (0, [x]) | (_, [x, _]) if j <= last => {
                let (stride, pad) = main[j];
                let y = cur.conv(x, stride, pad)?;
                let y = cur.bn(&y, j < last)?;
                let input = carried.last().expect("the block's input is carried");
                if j < last || blk.downsample {
                    Ok(vec![y, input.clone()])
                } else {
                    Ok(vec![layers::add_relu(&y, input)?])
                }
            }
            _ => bail!(
                "resnet: block {k} has no segment {j} of {} tensors",
                carried.len()
            ),
        }
    }
}

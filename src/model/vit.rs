//! `vit`: timm's `VisionTransformer` (class token, `global_pool='token'`, qkv bias, pre-norm
//! blocks, LayerNorm eps 1e-6, exact GELU) with timm's parameter names and order:
//! `cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.{norm1, attn.qkv, attn.proj,
//! norm2, mlp.fc1, mlp.fc2}`, `norm`, `head` (the head).

use super::{
    group_blocks, layers, BlockSpec, BufferSpec, Init, Mode, Network, Segment, TensorSpec,
};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// timm's LayerNorm epsilon in `VisionTransformer`.
pub const LN_EPS: f64 = 1e-6;

/// The size settings of a ViT (`model.patch`, `width`, `depth`, `heads`, `mlp_ratio`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VitShape {
    /// Patch side; the image sides must be multiples of it.
    pub patch: usize,
    /// Embedding width D.
    pub width: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Attention heads (divide D).
    pub heads: usize,
    /// MLP hidden width = `int(D * mlp_ratio)`.
    pub mlp_ratio: f64,
}

/// Vision transformer over the image size of the data.
pub struct Vit {
    input: [usize; 3],
    classes: usize,
    shape: VitShape,
    params: Vec<TensorSpec>,
    /// The forward's blocks: the embedding, each transformer block, the head.
    blocks: Vec<BlockSpec>,
}

impl Vit {
    /// A ViT for `input` `[C, H, W]`; its token count is `1 + (H/patch)(W/patch)`.
    pub fn new(input: [usize; 3], shape: VitShape, classes: usize) -> Result<Self> {
        let VitShape {
            patch,
            width,
            depth,
            heads,
            mlp_ratio,
        } = shape;
        if patch == 0 || width == 0 || depth == 0 || heads == 0 || classes == 0 {
            bail!("config keys `model.patch/width/depth/heads`: must be positive (got patch {patch}, width {width}, depth {depth}, heads {heads})");
        }
        if !width.is_multiple_of(heads) {
            bail!("config key `model.heads`: {heads} heads do not divide `model.width` = {width}");
        }
        if !input[1].is_multiple_of(patch)
            || !input[2].is_multiple_of(patch)
            || input[1] == 0
            || input[2] == 0
        {
            bail!(
                "config key `model.patch`: the {}x{} images are not a whole number of {patch}x{patch} patches",
                input[1],
                input[2]
            );
        }
        let hidden = (width as f64 * mlp_ratio) as usize;
        if !mlp_ratio.is_finite() || hidden == 0 {
            bail!("config key `model.mlp_ratio`: {mlp_ratio} gives an MLP width of 0");
        }
        let tokens = 1 + (input[1] / patch) * (input[2] / patch);
        let spec = |name: String, shape: Vec<usize>, init: Init| TensorSpec { name, shape, init };
        let linear = |params: &mut Vec<TensorSpec>, name: &str, out: usize, inp: usize| {
            params.push(spec(
                format!("{name}.weight"),
                vec![out, inp],
                Init::Normal(0.02),
            ));
            params.push(spec(format!("{name}.bias"), vec![out], Init::Zeros));
        };
        let norm = |params: &mut Vec<TensorSpec>, name: &str| {
            params.push(spec(format!("{name}.weight"), vec![width], Init::Ones));
            params.push(spec(format!("{name}.bias"), vec![width], Init::Zeros));
        };
        let fan_in = input[0] * patch * patch;
        let mut params = vec![
            spec("cls_token".into(), vec![1, 1, width], Init::Normal(1e-6)),
            spec(
                "pos_embed".into(),
                vec![1, tokens, width],
                Init::Normal(0.02),
            ),
            spec(
                "patch_embed.proj.weight".into(),
                vec![width, input[0], patch, patch],
                Init::FanIn(fan_in),
            ),
            spec(
                "patch_embed.proj.bias".into(),
                vec![width],
                Init::FanIn(fan_in),
            ),
        ];
        for i in 0..depth {
            let p = format!("blocks.{i}");
            norm(&mut params, &format!("{p}.norm1"));
            linear(&mut params, &format!("{p}.attn.qkv"), 3 * width, width);
            linear(&mut params, &format!("{p}.attn.proj"), width, width);
            norm(&mut params, &format!("{p}.norm2"));
            linear(&mut params, &format!("{p}.mlp.fc1"), hidden, width);
            linear(&mut params, &format!("{p}.mlp.fc2"), width, hidden);
        }
        norm(&mut params, "norm");
        linear(&mut params, "head", classes, width);
        let blocks = group_blocks(&params, &[], |n| {
            if n.starts_with("blocks.") {
                n.split('.').take(2).collect::<Vec<_>>().join(".")
            } else if n.starts_with("norm.") || n.starts_with("head.") {
                "head".into()
            } else {
                "embed".into()
            }
        })?;
        Ok(Vit {
            input,
            classes,
            shape,
            params,
            blocks,
        })
    }

    /// Patch embedding `[B, C, H, W] -> [B, L, D]` (patch `(i, j)` is token `i*W/p + j`):
    /// the stride-`p` convolution as one GEMM over the non-overlapping patches.
    fn embed(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (n, c, h, wd) = x.dims4()?;
        let p = self.shape.patch;
        let (gh, gw) = (h / p, wd / p);
        let cols = x
            .reshape((n, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((n * gh * gw, c * p * p))?;
        let y = layers::linear_rows(&cols, &w.reshape((self.shape.width, c * p * p))?, Some(b))?;
        Ok(y.reshape((n, gh * gw, self.shape.width))?)
    }
}

impl Network for Vit {
    fn arch(&self) -> &str {
        "vit"
    }
    fn params(&self) -> &[TensorSpec] {
        &self.params
    }
    fn buffers(&self) -> &[BufferSpec] {
        &[]
    }
    fn head_prefixes(&self) -> Vec<String> {
        vec!["head.".into()]
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
        if k == 0 {
            let (n, d) = (x.dim(0)?, self.shape.width);
            let tokens = self.embed(x, &p[2], &p[3])?;
            let cls = p[0].broadcast_as((n, 1, d))?;
            return Ok(Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&p[1])?);
        }
        if k > self.shape.depth {
            // The final norm acts per token; only the class token is pooled.
            let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
            let cls = layers::layer_norm(&cls, &p[0], &p[1], LN_EPS)?;
            return layers::linear_rows(&cls, &p[2], Some(&p[3]));
        }
        super::fold_segments(self, k, p, b, x, mode)
    }

    /// A transformer block is two segments: the attention half (`norm1`, `attn`, the
    /// residual add) and the MLP half (`norm2`, `mlp`, the residual add), so a
    /// recomputed backward holds one half's activations; the embedding and the head are
    /// one segment each.
    fn segments(&self, k: usize) -> Vec<Segment> {
        let whole = Segment::whole(&self.blocks[k]);
        if k == 0 || k > self.shape.depth {
            return vec![whole];
        }
        let half = |params| Segment {
            params,
            buffers: 0..0,
        };
        vec![half(0..6), half(6..whole.params.end)]
    }

    fn forward_segment(
        &self,
        k: usize,
        j: usize,
        q: &[Tensor],
        b: &mut [Tensor],
        carried: &[Tensor],
        mode: Mode,
    ) -> Result<Vec<Tensor>> {
        let [h] = carried else {
            bail!("vit: block {k} carries one tensor");
        };
        if k == 0 || k > self.shape.depth {
            return Ok(vec![self.forward_block(k, q, b, h, mode)?]);
        }
        Ok(vec![match j {
            0 => {
                let a = layers::layer_norm(h, &q[0], &q[1], LN_EPS)?;
                let a = super::attention::multi_head_attention(
                    &a,
                    &q[2],
                    Some(&q[3]),
                    &q[4],
                    Some(&q[5]),
                    self.shape.heads,
                )?;
                (h + a)?
            }
            1 => {
                let m = layers::layer_norm(h, &q[0], &q[1], LN_EPS)?;
                let m = layers::gelu_erf(&layers::linear_rows(&m, &q[2], Some(&q[3]))?)?;
                (h + layers::linear_rows(&m, &q[4], Some(&q[5]))?)?
            }
            _ => bail!("vit: block {k} has no segment {j}"),
        }])
    }
}

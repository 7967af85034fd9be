//! Dispatch in one place: which implementation a computation takes, and in which element
//! type a host kernel runs.
//!
//! The layer functions, the optimizer update and the DPU fold each exist twice: as host
//! kernels written in the project (CPU storage only) and as candle tensor ops (any
//! device). [`generic_path`] is the one switch between the two. The host kernels of the
//! layer functions are written once over [`Float`] (f32, f64, bf16) as [`HostKernel`]s;
//! [`HostOp`] runs one as a candle custom op, and the element type of its storage is
//! matched in one place, [`for_dtype`], in the style of candle's own CPU backend
//! (`cpu_backend/utils.rs`): any other dtype is an error naming the op and the dtype,
//! never a silent conversion.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor, WithDType,
};
use half::bf16;
use rayon::prelude::*;
use std::cell::Cell;

// ------------------------------------------------------------------------ which path

thread_local! {
    /// Set inside [`with_generic_ops`].
    static FORCE_GENERIC: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every device-dependent choice of [`generic_path`] (the layer functions,
/// the optimizer update, the DPU fold between live tensors) taking its device-generic
/// path on the CPU too, on this thread, so tests can compare whole networks and whole
/// training runs across the two paths. Work on other threads is not forced.
#[doc(hidden)]
pub fn with_generic_ops<R>(f: impl FnOnce() -> R) -> R {
    let prev = FORCE_GENERIC.with(|c| c.replace(true));
    let r = f();
    FORCE_GENERIC.with(|c| c.set(prev));
    r
}

/// The one switch between host kernels and device-generic candle ops, for the layer
/// functions, the optimizer and the DPU fold: the generic path for tensors off the CPU
/// (the host kernels read CPU storage only), or inside [`with_generic_ops`].
pub(crate) fn generic_path(t: &Tensor) -> bool {
    !t.device().is_cpu() || FORCE_GENERIC.with(|c| c.get())
}

// ---------------------------------------------------------------- which element type

/// Elements per parallel task of the host kernels' element-wise passes: large enough to
/// amortize rayon's dispatch, small enough to balance two or more threads.
pub(crate) const ELEMS_PER_TASK: usize = 4096;

/// The element types the host kernels compute in: f32, f64 and bf16.
pub(crate) trait Float: WithDType {
    /// The type a backward pass sums overlapping contributions in (max-pool windows,
    /// im2col patches) before rounding once: f32 for bf16, the type itself otherwise.
    type Sum: Float;
    /// The square root as candle's `sqrt` rounds it.
    fn sqrt(self) -> Self;
    /// This value in `Sum`, exactly (candle's `to_dtype` widening).
    fn widen(self) -> Self::Sum;
    /// A `Sum` value rounded to `Self` as candle's `to_dtype` rounds it (bf16: to
    /// nearest, ties to even); the identity when `Sum` is `Self`.
    fn narrow(s: Self::Sum) -> Self;
    /// `if take { a } else { b }` on the bit patterns. The baseline x86-64 build
    /// compiles a select between floats in a loop it does not vectorize to a branch on
    /// the data, which mispredicts on about half of a ReLU mask (7 ns an element).
    fn select(take: bool, a: Self, b: Self) -> Self;
}

impl Float for f32 {
    type Sum = f32;
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn widen(self) -> f32 {
        self
    }
    fn narrow(s: f32) -> Self {
        s
    }
    fn select(take: bool, a: Self, b: Self) -> Self {
        let m = u32::from(take).wrapping_neg();
        Self::from_bits((a.to_bits() & m) | (b.to_bits() & !m))
    }
}

impl Float for f64 {
    type Sum = f64;
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn widen(self) -> f64 {
        self
    }
    fn narrow(s: f64) -> Self {
        s
    }
    fn select(take: bool, a: Self, b: Self) -> Self {
        let m = u64::from(take).wrapping_neg();
        Self::from_bits((a.to_bits() & m) | (b.to_bits() & !m))
    }
}

impl Float for bf16 {
    type Sum = f32;
    fn sqrt(self) -> Self {
        bf16::from_f32(self.to_f32().sqrt())
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(s: f32) -> Self {
        bf16::from_f32(s)
    }
    fn select(take: bool, a: Self, b: Self) -> Self {
        let m = u16::from(take).wrapping_neg();
        Self::from_bits((a.to_bits() & m) | (b.to_bits() & !m))
    }
}

/// `v` in `T::Sum`: borrowed when `T` is its own `Sum` (f32, f64), else widened into a
/// new vector (bf16 to f32), so a kernel that computes in `T::Sum` reads f32 in place.
pub(crate) fn widened<T: Float>(v: &[T]) -> std::borrow::Cow<'_, [T::Sum]> {
    if T::DTYPE == <T::Sum as WithDType>::DTYPE {
        // SAFETY: the three `Float` types have distinct dtypes, so equal dtypes mean
        // `T::Sum` is `T`: the same elements, layout and length.
        let same = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<T::Sum>(), v.len()) };
        return std::borrow::Cow::Borrowed(same);
    }
    std::borrow::Cow::Owned(v.iter().map(|x| x.widen()).collect())
}

/// `v` rounded to `T` ([`Float::narrow`]); moved without a copy when `T` is its own
/// `Sum`.
pub(crate) fn narrowed<T: Float>(v: Vec<T::Sum>) -> Vec<T> {
    if T::DTYPE == <T::Sum as WithDType>::DTYPE {
        let mut v = std::mem::ManuallyDrop::new(v);
        // SAFETY: as in `widened`, `T::Sum` is `T`; the allocation is handed over whole
        // (pointer, length and capacity of the same element type).
        return unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<T>(), v.len(), v.capacity()) };
    }
    v.into_iter().map(T::narrow).collect()
}

/// Work written once over the element type (the generic `f` of candle's `Map1`).
trait ForDType {
    /// What the work returns.
    type Output;
    /// The work in element type `T`.
    fn f<T: Float>(self) -> candle_core::Result<Self::Output>;
}

/// Runs `work` in the element type `dt` names: the one match on the element type behind
/// the host kernels. A dtype other than f32, f64 and bf16 is an error naming `op` and
/// `dt`.
fn for_dtype<W: ForDType>(op: &'static str, dt: DType, work: W) -> candle_core::Result<W::Output> {
    match dt {
        DType::F32 => work.f::<f32>(),
        DType::F64 => work.f::<f64>(),
        DType::BF16 => work.f::<bf16>(),
        dt => Err(candle_core::Error::UnsupportedDTypeForOp(dt, op).bt()),
    }
}

// ---------------------------------------------------------------------- host kernels

/// A host kernel of `N` input tensors of one element type, its arithmetic written once
/// over [`Float`]: the forward from the inputs' elements, the backward as the gradient
/// of each input. [`HostOp`] makes it a candle custom op.
pub(crate) trait HostKernel<const N: usize>: Send + Sync + 'static {
    /// The op's name, for candle and for errors.
    const NAME: &'static str;

    /// The output shape when the first input has shape `x` (by default `x`).
    fn shape(&self, x: &Shape) -> candle_core::Result<Shape> {
        Ok(x.clone())
    }

    /// The output elements from the contiguous elements of the inputs; `x` is the shape
    /// of the first.
    fn fwd<T: Float>(&self, xs: [&[T]; N], x: &Shape) -> candle_core::Result<Vec<T>>;

    /// The gradient of each input from the inputs, the result and the result's
    /// gradient (`None` for an input that needs none: an untracked one); `T` is the
    /// inputs' element type.
    fn bwd<T: Float>(
        &self,
        args: [&Tensor; N],
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; N]>;
}

/// A [`HostKernel`] as a candle custom op of 1, 2 or 3 inputs: the forward runs on CPU
/// storage in the first input's element type, and candle records the backward.
pub(crate) struct HostOp<K>(pub K);

impl<K> HostOp<K> {
    /// The kernel's forward on CPU storages (`N` is 1, 2 or 3: `xs[0]` exists).
    fn forward<const N: usize>(
        &self,
        xs: [(&CpuStorage, &Layout); N],
    ) -> candle_core::Result<(CpuStorage, Shape)>
    where
        K: HostKernel<N>,
    {
        let (s, l) = xs[0];
        let out = for_dtype(
            K::NAME,
            s.dtype(),
            Forward {
                kernel: &self.0,
                xs,
            },
        )?;
        Ok((out, self.0.shape(l.shape())?))
    }

    /// The kernel's backward, in the first input's element type.
    fn backward<const N: usize>(
        &self,
        args: [&Tensor; N],
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; N]>
    where
        K: HostKernel<N>,
    {
        let work = Backward {
            kernel: &self.0,
            args,
            res,
            grad,
        };
        for_dtype(K::NAME, args[0].dtype(), work)
    }
}

/// [`HostKernel::fwd`] on CPU storages, as work for [`for_dtype`].
struct Forward<'a, K, const N: usize> {
    kernel: &'a K,
    xs: [(&'a CpuStorage, &'a Layout); N],
}

impl<K: HostKernel<N>, const N: usize> ForDType for Forward<'_, K, N> {
    type Output = CpuStorage;

    fn f<T: Float>(self) -> candle_core::Result<CpuStorage> {
        let mut xs = [<&[T]>::default(); N];
        for (x, (s, l)) in xs.iter_mut().zip(self.xs) {
            *x = contiguous_slice(s, l, K::NAME)?;
        }
        let out = self.kernel.fwd(xs, self.xs[0].1.shape())?;
        Ok(T::to_cpu_storage_owned(out))
    }
}

/// [`HostKernel::bwd`], as work for [`for_dtype`].
struct Backward<'a, K, const N: usize> {
    kernel: &'a K,
    args: [&'a Tensor; N],
    res: &'a Tensor,
    grad: &'a Tensor,
}

impl<K: HostKernel<N>, const N: usize> ForDType for Backward<'_, K, N> {
    type Output = [Option<Tensor>; N];

    fn f<T: Float>(self) -> candle_core::Result<[Option<Tensor>; N]> {
        self.kernel.bwd::<T>(self.args, self.res, self.grad)
    }
}

impl<K: HostKernel<1>> CustomOp1 for HostOp<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward([(s, l)])
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let [g] = self.backward([arg], res, grad)?;
        Ok(g)
    }
}

impl<K: HostKernel<2>> CustomOp2 for HostOp<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward([(s1, l1), (s2, l2)])
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let [g1, g2] = self.backward([a1, a2], res, grad)?;
        Ok((g1, g2))
    }
}

impl<K: HostKernel<3>> CustomOp3 for HostOp<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward([(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [g1, g2, g3] = self.backward([a1, a2, a3], res, grad)?;
        Ok((g1, g2, g3))
    }
}

/// An op of an input, a weight and an optional bias on CPU storages (the convolution,
/// the linear over rows): one forward and one backward, which [`WeightOp`] serves as
/// candle's two-input op (no bias) and three-input op.
pub(crate) trait WeightKernel: Send + Sync + 'static {
    /// The op's name, for candle and for errors.
    const NAME: &'static str;

    /// The output from the input `x`, the weight `w` and the bias `b`, if any.
    fn forward(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)>;

    /// The gradients of `x`, `w` and `b` (`None` for an untracked or absent input).
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        grad: &Tensor,
    ) -> candle_core::Result<[Option<Tensor>; 3]>;
}

/// A [`WeightKernel`] as a candle custom op of 2 or 3 inputs.
pub(crate) struct WeightOp<K>(pub K);

/// Records `k` on `x`, `w` and `b`, if any.
pub(crate) fn apply_weight_op<K: WeightKernel>(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    k: K,
) -> candle_core::Result<Tensor> {
    match b {
        Some(b) => x.apply_op3(w, b, WeightOp(k)),
        None => x.apply_op2(w, WeightOp(k)),
    }
}

impl<K: WeightKernel> CustomOp2 for WeightOp<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.forward((s1, l1), (s2, l2), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let [gx, gw, _] = self.0.backward(x, w, None, grad)?;
        Ok((gx, gw))
    }
}

impl<K: WeightKernel> CustomOp3 for WeightOp<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.forward((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [gx, gw, gb] = self.0.backward(x, w, Some(b), grad)?;
        Ok((gx, gw, gb))
    }
}

/// The elements of a contiguous CPU storage as `T` (an error for another layout or
/// element type, naming `what`): the inputs of the host kernels and the optimizer's.
pub(crate) fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what} expects a contiguous input")
    };
    Ok(&s.as_slice::<T>()?[a..b])
}

/// `f(a[i], b[i])` for every element of two equal-length slices, in parallel over
/// [`ELEMS_PER_TASK`] chunks: the element-wise passes of the host kernels (a residual
/// ReLU, the ReLU and GELU backward).
pub(crate) fn zip_map<T: WithDType>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut out = vec![T::zero(); a.len()];
    out.par_chunks_mut(ELEMS_PER_TASK)
        .zip(
            a.par_chunks(ELEMS_PER_TASK)
                .zip(b.par_chunks(ELEMS_PER_TASK)),
        )
        .for_each(|(o, (a, b))| {
            for (o, (&a, &b)) in o.iter_mut().zip(a.iter().zip(b)) {
                *o = f(a, b);
            }
        });
    out
}

/// Per channel, the sum over `(N, H, W)` of `f(channel, image, pixel)`, from zero in
/// memory order, in `T`: candle's reduction of a contiguous `[N, C, H, W]` over
/// `(0, 2, 3)` (BatchNorm's statistics and gradients, a convolution's bias gradient).
pub(crate) fn channel_sums<T: WithDType + Send + Sync>(
    n: usize,
    c: usize,
    hw: usize,
    f: impl Fn(usize, usize, usize) -> T + Sync,
) -> Vec<T> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let mut s = T::zero();
            for i in 0..n {
                for q in 0..hw {
                    s += f(ch, i, q);
                }
            }
            s
        })
        .collect()
}

/// The sum of squares of a CPU tensor's elements, each widened to f64, summed in
/// element order from zero: the bits of `t.to_dtype(F64)?.sqr()?.sum_all()` (candle sums
/// f64 in order) without that expression's two f64 copies of `t`, which made gradient
/// clipping's peak three times the largest gradient.
pub(crate) fn sum_of_squares(t: &Tensor) -> candle_core::Result<f64> {
    struct Work<'a>(&'a Tensor);
    impl ForDType for Work<'_> {
        type Output = f64;
        fn f<T: Float>(self) -> candle_core::Result<f64> {
            with_cpu_slice::<T, _>(self.0, sum_of_squares_of)
        }
    }
    for_dtype("sum_of_squares", t.dtype(), Work(&t.contiguous()?))
}

/// The sum of squares of `v`, each element widened to f64, summed in order from zero:
/// [`sum_of_squares`] on a slice (a host gradient's values).
pub(crate) fn sum_of_squares_of<T: WithDType>(v: &[T]) -> f64 {
    v.iter().fold(0f64, |s, x| {
        let d = x.to_f64();
        s + d * d
    })
}

/// `f` on the elements of `t` (contiguous, on the CPU, of element type `T`) in place,
/// without the copy [`flat_values`] makes: what a backward reads a large gradient as.
pub(crate) fn with_cpu_slice<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(cs) => Ok(f(contiguous_slice::<T>(cs, l, "a host kernel's backward")?)),
        _ => candle_core::bail!("a host kernel's backward expects a CPU tensor"),
    }
}

/// `f` on the elements of `t` as `T`: in place when `t` is a contiguous CPU tensor of
/// element type `T` (the usual case in a backward pass: gradients and kept inputs),
/// else on a copy ([`flat_values`]).
pub(crate) fn read_values<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> candle_core::Result<R> {
    if t.dtype() == T::DTYPE && t.is_contiguous() && t.device().is_cpu() {
        return with_cpu_slice(t, f);
    }
    Ok(f(&flat_values::<T>(t)?))
}

/// Values of `t` (any layout, any dtype) as a flat vector of `T`: what the host kernels'
/// backward passes read their tensors as.
pub(crate) fn flat_values<T: WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.to_dtype(T::DTYPE)?.flatten_all()?.to_vec1::<T>()
}

//! The counting allocator (`ldt::heap`) measures the process's heap: a known allocation
//! moves the live bytes and the peak by its size, and a run records its peaks by stage in
//! `summary.json` (`measured_memory`), with the counterpart buffer's host arena counted
//! apart. One test function, so no other test of this binary allocates meanwhile.

mod common;
use common::*;
use ldt::heap;

#[test]
fn the_heap_is_counted() {
    // A known allocation: 64 MiB, touched so it is really there.
    const N: usize = 64 << 20;
    let before = heap::live();
    heap::take_peak();
    let v = std::hint::black_box(vec![1u8; N]);
    let during = heap::live();
    assert!(
        during >= before + N as u64 && during < before + N as u64 + (4 << 20),
        "live {before} -> {during} for a {N}-byte allocation"
    );
    drop(v);
    let after = heap::live();
    assert!(
        after < during - (N as u64) + (4 << 20),
        "freed: {during} -> {after}"
    );
    assert!(heap::take_peak() >= before + N as u64, "the peak saw it");

    // A run's stages: the training window holds at least the computed plan (weights,
    // gradients, optimizer state: all heap tensors on a CPU); the host arena is exactly
    // the counterpart buffer's RAM tier.
    let toml = r#"
seed = 2
threads = 1
[model]
arch = "cnn"
[train]
method = "ldt-s"
steps = 6
batch_size = 16
[stage1]
stat_batches = 3
[eval]
every = 3
[ldt_s]
p_steps = 2
a_steps = 2
[checkpoint]
every = 3
"#;
    let (_dir, ctx) = run(toml, &[&bundled_manifest()]);
    let plan = ctx.summary.memory.expect("memory plan");
    let m = ctx
        .summary
        .measured_memory
        .clone()
        .expect("measured memory");
    eprintln!("plan {plan:?}\nmeasured {m:?}");
    for stage in ["setup", "stage1", "train", "eval", "checkpoint", "export"] {
        assert!(m.stages.contains_key(stage), "no `{stage}` peak: {m:?}");
    }
    assert!(
        m.stages["train"] >= plan.live_peak,
        "train peak {} below the plan's live peak {}",
        m.stages["train"],
        plan.live_peak
    );
    assert!(m.process_peak >= *m.stages.values().max().unwrap());
    assert_eq!(m.host_arena_peak, plan.counterparts_ram);
}

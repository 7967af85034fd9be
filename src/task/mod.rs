//! The task a run trains for, and how its outputs are scored.

pub mod quality;

//! Benchmarks live in `benches/`; run them with `cargo bench -p mayfly-benches`.

use std::time::{Duration, Instant};

/// How many times per second `f` runs, over about `d` (in batches of 100,
/// so the clock is read rarely).
pub fn per_second(d: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < d {
        for _ in 0..100 {
            f();
        }
        n += 100;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

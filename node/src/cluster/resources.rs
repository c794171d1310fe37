//! What this node offers the cluster: memory (total, available, the budget
//! the planner may use), the compute device, and a measured compute score.

use std::time::Instant;

use kernels::{BlockFormat, QuantMatrix};

use super::protocol::Resources;
use crate::limits::MEMORY_RESERVE_BYTES;

/// Total and available memory from `/proc/meminfo`; `None` where there is
/// no such file (not Linux).
pub fn system_memory() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// Resident and peak resident memory of this process (`VmRSS`, `VmHWM`).
pub fn process_memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kib| kib * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Quantized mat-vec throughput in GFLOP/s: a 4096×4096 Q8_0 matrix times a
/// vector, a few times, on the node's compute threads. About 100 ms.
pub fn measure_compute_score() -> f64 {
    const N: usize = 4096;
    let blocks = N * N / 32;
    let mut data = Vec::with_capacity(blocks * 34);
    for i in 0..blocks {
        data.extend_from_slice(&half_one_over(64 + (i % 7) as u16));
        data.extend((0..32).map(|j| ((i * 31 + j * 17) % 255) as u8));
    }
    let Ok(matrix) = QuantMatrix::new("compute score", BlockFormat::Q8_0, N, N, data) else {
        return 0.0;
    };
    let x: Vec<f32> = (0..N).map(|i| ((i % 13) as f32 - 6.0) / 7.0).collect();
    let _ = matrix.matmul(&x, 1); // warm up caches and threads
    let rounds = 5;
    let started = Instant::now();
    for _ in 0..rounds {
        let _ = matrix.matmul(&x, 1);
    }
    let seconds = started.elapsed().as_secs_f64();
    if seconds > 0.0 {
        (2 * N * N * rounds) as f64 / seconds / 1e9
    } else {
        0.0
    }
}

/// An f16 scale of 1/n, little endian.
fn half_one_over(n: u16) -> [u8; 2] {
    half::f16::from_f32(1.0 / f32::from(n)).to_le_bytes()
}

/// This node's resources; `budget` overrides the default memory budget.
pub fn describe(device: &str, budget: Option<u64>, compute_score: f64) -> Resources {
    let (total, available) = system_memory().unwrap_or((0, 0));
    Resources {
        device: device.to_string(),
        device_name: if device == "cpu" {
            cpu_name()
        } else {
            device.to_string()
        },
        memory_total_bytes: total,
        memory_available_bytes: available,
        memory_budget_bytes: budget
            .unwrap_or_else(|| available.saturating_sub(MEMORY_RESERVE_BYTES)),
        compute_score,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read() {
        let (total, available) = system_memory().expect("/proc/meminfo");
        assert!(total > 0 && available > 0 && available <= total);
        let (rss, peak) = process_memory();
        assert!(rss > 0 && peak >= rss);
    }

    #[test]
    fn budget_defaults_to_available_less_reserve() {
        let r = describe("cpu", None, 1.0);
        assert_eq!(
            r.memory_budget_bytes,
            r.memory_available_bytes
                .saturating_sub(MEMORY_RESERVE_BYTES)
        );
        assert_eq!(
            describe("cpu", Some(40 << 20), 1.0).memory_budget_bytes,
            40 << 20
        );
        assert!(!r.device_name.is_empty());
    }

    #[test]
    fn compute_score_is_measured() {
        assert!(measure_compute_score() > 0.0);
    }
}

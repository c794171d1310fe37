//! Numbers as people read them.

use api_types::NodeId;

pub fn bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub fn bandwidth(bytes_per_second: u64) -> String {
    let bits = bytes_per_second as f64 * 8.0;
    if bits >= 1e9 {
        format!("{:.1} Gbit/s", bits / 1e9)
    } else {
        format!("{:.0} Mbit/s", bits / 1e6)
    }
}

pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        (part as f64 / whole as f64 * 100.0).clamp(0.0, 100.0)
    }
}

/// A node id as a short tag: its first 8 hex digits.
pub fn short_id(id: NodeId) -> String {
    id.to_string().chars().take(8).collect()
}

/// Colours for nodes, in ring order; the same everywhere on the page.
pub fn node_colour(index: usize) -> &'static str {
    const COLOURS: [&str; 8] = [
        "#6d5dfc", "#17a673", "#f08c2e", "#2f8fe0", "#d6457e", "#8a6d3b", "#0fa3b1", "#7a7f94",
    ];
    COLOURS[index % COLOURS.len()]
}

//! How sizes and durations are written in `mayfly.toml`, as serde
//! deserialisers.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// `"64MiB"`, `"512KiB"`, `"1GiB"`, or plain bytes.
pub(super) fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let s = String::deserialize(d)?;
    let t = s.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => 0,
    };
    digits
        .parse::<u64>()
        .ok()
        .filter(|_| scale > 0)
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "size {s:?}: a number of bytes, or with KiB, MiB or GiB (e.g. \"64MiB\")"
            ))
        })
}

pub(super) fn optional_duration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "duration {s:?}: {e} (e.g. \"90s\", \"5m\", \"8h\")"
        ))
    })
}

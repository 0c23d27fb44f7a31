//! Reads the summary table `strace -c` writes (`-o FILE`): calls per
//! syscall. Columns are located by the header, so an empty `errors` cell or
//! a strace that adds columns does not shift the counts.

use std::collections::BTreeMap;

/// The syscalls that make data durable; their sum is the fsync figure.
pub const SYNC_CALLS: &[&str] = &["fsync", "fdatasync", "sync_file_range", "syncfs", "msync"];

/// Calls per syscall in one summary; the `total` row is left out.
pub fn parse_summary(text: &str) -> Result<BTreeMap<String, u64>, String> {
    // strace -c writes nothing at all when no traced syscall was made.
    if text.trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut lines = text.lines();
    let header = lines
        .by_ref()
        .find(|l| {
            let t: Vec<&str> = l.split_whitespace().collect();
            t.contains(&"calls") && t.contains(&"syscall")
        })
        .ok_or_else(|| format!("no strace summary header in {:?}", head(text)))?;
    // "% time" is one column spelt as two words.
    let cols: Vec<&str> = header.split_whitespace().filter(|t| *t != "%").collect();
    let calls_at = cols
        .iter()
        .position(|c| *c == "calls")
        .expect("found above");
    let mut out = BTreeMap::new();
    for l in lines {
        let t: Vec<&str> = l.split_whitespace().collect();
        if t.is_empty() || t[0].starts_with('-') {
            continue;
        }
        let name = *t.last().expect("non-empty");
        if name == "total" {
            continue;
        }
        // Cells before `calls` are always filled; only `errors` may be blank.
        let calls = t
            .get(calls_at)
            .and_then(|c| c.parse::<u64>().ok())
            .ok_or_else(|| format!("strace summary row without a call count: {l:?}"))?;
        *out.entry(name.to_owned()).or_insert(0) += calls;
    }
    Ok(out)
}

/// Sum of the durability syscalls in a parsed summary.
pub fn sync_calls(summary: &BTreeMap<String, u64>) -> u64 {
    SYNC_CALLS
        .iter()
        .map(|s| summary.get(*s).copied().unwrap_or(0))
        .sum()
}

fn head(s: &str) -> &str {
    let mut end = s.len().min(128);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

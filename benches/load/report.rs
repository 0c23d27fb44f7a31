//! The figures of one run and how they print: a markdown table with the
//! value, the floor it is compared with, the ratio and the target.

use serde::Serialize;

/// How a ratio is held to its target.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum Bound {
    AtMost(f64),
    AtLeast(f64),
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub figure: String,
    pub value: f64,
    pub unit: &'static str,
    /// What the ratio divides by, with its value ("Probe p50 0.110 ms").
    pub baseline: Option<String>,
    pub ratio: Option<f64>,
    /// The target, as text ("p50 ≤ 2× Probe").
    pub target: Option<String>,
    pub met: Option<bool>,
}

impl Row {
    pub fn new(figure: impl Into<String>, value: f64, unit: &'static str) -> Row {
        Row {
            figure: figure.into(),
            value,
            unit,
            baseline: None,
            ratio: None,
            target: None,
            met: None,
        }
    }

    /// The ratio value / `base` (named `name`, in this row's unit or `unit`).
    pub fn vs(mut self, name: &str, base: f64, unit: &str) -> Row {
        self.baseline = Some(format!("{name} {} {unit}", fmt(base)));
        self.ratio = (base > 0.0).then(|| self.value / base);
        self
    }

    /// A target on the ratio.
    pub fn target(mut self, text: &str, b: Bound) -> Row {
        self.met = self.ratio.map(|r| match b {
            Bound::AtMost(x) => r <= x,
            Bound::AtLeast(x) => r >= x,
        });
        self.target = Some(text.to_owned());
        self
    }

    /// A target on the value itself.
    pub fn target_value(mut self, text: &str, b: Bound) -> Row {
        self.met = Some(match b {
            Bound::AtMost(x) => self.value <= x,
            Bound::AtLeast(x) => self.value >= x,
        });
        self.target = Some(text.to_owned());
        self
    }
}

pub fn fmt(v: f64) -> String {
    let a = v.abs();
    if v == v.trunc() && a < 1e9 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| figure | value | baseline (same run) | ratio | target | met |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} {} | {} | {} | {} | {} |\n",
            r.figure,
            fmt(r.value),
            r.unit,
            r.baseline.as_deref().unwrap_or("–"),
            r.ratio.map_or("–".into(), |x| format!("{}×", fmt(x))),
            r.target.as_deref().unwrap_or("–"),
            match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "–",
            }
        ));
    }
    s
}

/// Figure by figure: embedded, remote and remote/embedded (values; and the
/// ratios to each run's own floors, which cancel the host's noise).
pub fn compare(emb: &[Row], rem: &[Row]) -> String {
    let mut s = String::from(
        "| figure | embedded | remote | remote/embedded | ratio to floor: embedded → remote |\n|---|---|---|---|---|\n",
    );
    for e in emb {
        let Some(r) = rem.iter().find(|r| r.figure == e.figure) else {
            continue;
        };
        let q = if e.value != 0.0 {
            format!("{}×", fmt(r.value / e.value))
        } else {
            "–".into()
        };
        let floors = match (e.ratio, r.ratio) {
            (Some(a), Some(b)) => format!("{}× → {}×", fmt(a), fmt(b)),
            _ => "–".into(),
        };
        s.push_str(&format!(
            "| {} | {} {} | {} {} | {} | {} |\n",
            e.figure,
            fmt(e.value),
            e.unit,
            fmt(r.value),
            r.unit,
            q,
            floors
        ));
    }
    s
}

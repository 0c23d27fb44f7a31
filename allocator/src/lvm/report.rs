//! `lvm fullreport --reportformat json --units b --nosuffix`, parsed into a
//! snapshot of volume groups, physical volumes, logical volumes and their
//! segments. LVM prints every value as a string; sizes are bytes.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Options that make every size a plain byte count.
pub const REPORT_ARGS: &[&str] = &["--reportformat", "json", "--units", "b", "--nosuffix"];

#[derive(Debug, Deserialize)]
struct Root {
    report: Vec<Section>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct Section {
    vg: Vec<BTreeMap<String, String>>,
    pv: Vec<BTreeMap<String, String>>,
    lv: Vec<BTreeMap<String, String>>,
    seg: Vec<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vg {
    pub name: String,
    pub tags: Vec<String>,
    pub extent_size: u64,
    pub extent_count: u64,
    pub free_count: u64,
    pub pvs: Vec<Pv>,
    pub lvs: Vec<Lv>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pv {
    pub name: String,
    /// The volume group, empty for a PV in none.
    pub vg: String,
    pub pe_start: u64,
    pub size: u64,
}

/// (PV device, first physical extent, extent count)
pub type PeRange = (String, u64, u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lv {
    pub name: String,
    pub tags: Vec<String>,
    pub size: u64,
    pub path: String,
    pub active: bool,
    /// Where its bytes are, in order.
    pub ranges: Vec<PeRange>,
}

/// Everything one `fullreport` showed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub vgs: Vec<Vg>,
    /// Every PV seen, in a volume group or not.
    pub pvs: Vec<Pv>,
}

impl Snapshot {
    pub fn vg(&self, name: &str) -> Option<&Vg> {
        self.vgs.iter().find(|v| v.name == name)
    }

    pub fn pv(&self, device: &str) -> Option<&Pv> {
        self.pvs.iter().find(|p| p.name == device)
    }
}

impl Vg {
    pub fn lv(&self, name: &str) -> Option<&Lv> {
        self.lvs.iter().find(|l| l.name == name)
    }
}

fn field<'a>(m: &'a BTreeMap<String, String>, k: &str) -> &'a str {
    m.get(k).map_or("", String::as_str)
}

fn num(m: &BTreeMap<String, String>, k: &str) -> Result<u64> {
    let v = field(m, k);
    v.trim().parse().map_err(|_| {
        Error::Device(format!(
            "lvm report: field {k} is {v:?}, not a number (is the lvm version supported?)"
        ))
    })
}

fn tags(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `/dev/pmem0:0-4 /dev/pmem1:10-12` → (device, first, count) each.
fn ranges(s: &str) -> Result<Vec<PeRange>> {
    s.split_whitespace()
        .map(|r| {
            let bad = || Error::Device(format!("lvm report: segment range {r:?} is malformed"));
            let (dev, span) = r.rsplit_once(':').ok_or_else(bad)?;
            let (a, b) = span.split_once('-').ok_or_else(bad)?;
            let (a, b): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
            if b < a {
                return Err(bad());
            }
            Ok((dev.to_owned(), a, b - a + 1))
        })
        .collect()
}

/// Parses a fullreport.
pub fn parse(json: &str) -> Result<Snapshot> {
    let root: Root = serde_json::from_str(json)
        .map_err(|e| Error::Device(format!("lvm fullreport is not the expected json: {e}")))?;
    let mut snap = Snapshot::default();
    for sec in root.report {
        let pvs = sec
            .pv
            .iter()
            .map(|p| {
                Ok(Pv {
                    name: field(p, "pv_name").to_owned(),
                    vg: String::new(),
                    pe_start: num(p, "pe_start")?,
                    size: num(p, "pv_size")?,
                })
            })
            .collect::<Result<Vec<Pv>>>()?;
        let Some(v) = sec.vg.first() else {
            snap.pvs.extend(pvs);
            continue;
        };
        let name = field(v, "vg_name").to_owned();
        let pvs: Vec<Pv> = pvs
            .into_iter()
            .map(|p| Pv {
                vg: name.clone(),
                ..p
            })
            .collect();
        let mut segs: BTreeMap<&str, Vec<(u64, Vec<PeRange>)>> = BTreeMap::new();
        for s in &sec.seg {
            segs.entry(field(s, "lv_uuid"))
                .or_default()
                .push((num(s, "seg_start")?, ranges(field(s, "seg_pe_ranges"))?));
        }
        let lvs = sec
            .lv
            .iter()
            .map(|l| {
                let mut ss = segs.remove(field(l, "lv_uuid")).unwrap_or_default();
                ss.sort_by_key(|(start, _)| *start);
                Ok(Lv {
                    name: field(l, "lv_name").to_owned(),
                    tags: tags(field(l, "lv_tags")),
                    size: num(l, "lv_size")?,
                    path: field(l, "lv_path").to_owned(),
                    active: field(l, "lv_active") == "active",
                    ranges: ss.into_iter().flat_map(|(_, r)| r).collect(),
                })
            })
            .collect::<Result<Vec<Lv>>>()?;
        snap.vgs.push(Vg {
            name,
            tags: tags(field(v, "vg_tags")),
            extent_size: num(v, "vg_extent_size")?,
            extent_count: num(v, "vg_extent_count")?,
            free_count: num(v, "vg_free_count")?,
            pvs: pvs.clone(),
            lvs,
        });
        snap.pvs.extend(pvs);
    }
    Ok(snap)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from what lvm 2.03.16 (Debian 12) printed here.
    const SAMPLE: &str = r#"{
      "report": [
        {
          "vg": [{"vg_name":"pmem-region0", "vg_tags":"pmem-agent", "vg_extent_size":"4194304",
                  "vg_extent_count":"255", "vg_free_count":"248", "vg_size":"1069547520"}],
          "pv": [{"pv_name":"/dev/loop0", "pe_start":"2097152", "pv_size":"1069547520"}],
          "lv": [{"lv_uuid":"U1", "lv_name":"pmem-a", "lv_tags":"pmem-agent", "lv_size":"20971520",
                  "lv_path":"/dev/pmem-region0/pmem-a", "lv_active":"unknown"},
                 {"lv_uuid":"U2", "lv_name":"theirs", "lv_tags":"", "lv_size":"8388608",
                  "lv_path":"/dev/pmem-region0/theirs", "lv_active":"active"}],
          "pvseg": [],
          "seg": [{"lv_uuid":"U1", "seg_start":"8388608", "seg_pe_ranges":"/dev/loop0:7-9"},
                  {"lv_uuid":"U1", "seg_start":"0", "seg_pe_ranges":"/dev/loop0:0-1"},
                  {"lv_uuid":"U2", "seg_start":"0", "seg_pe_ranges":"/dev/loop0:2-3"}]
        },
        { "vg": [], "pv": [{"pv_name":"/dev/loop1", "pe_start":"1048576", "pv_size":"1072693248"}],
          "lv": [], "pvseg": [], "seg": [] }
      ]
    }"#;

    #[test]
    fn parses_a_fullreport() {
        let s = parse(SAMPLE).unwrap();
        let vg = s.vg("pmem-region0").unwrap();
        assert_eq!(
            (vg.extent_size, vg.extent_count, vg.free_count),
            (4 << 20, 255, 248)
        );
        assert_eq!(vg.tags, ["pmem-agent"]);
        let a = vg.lv("pmem-a").unwrap();
        // Segments in LV order, whatever order the report used.
        assert_eq!(
            a.ranges,
            [
                ("/dev/loop0".to_owned(), 0, 2),
                ("/dev/loop0".to_owned(), 7, 3)
            ]
        );
        assert!(!a.active);
        assert!(vg.lv("theirs").unwrap().active);
        assert_eq!(s.pv("/dev/loop1").unwrap().vg, "");
        assert_eq!(s.pv("/dev/loop0").unwrap().vg, "pmem-region0");
        assert_eq!(s.pv("/dev/loop0").unwrap().pe_start, 2 << 20);
    }

    #[test]
    fn malformed_reports_are_errors() {
        assert!(parse("WARNING: something\n").is_err());
        let bad = SAMPLE.replace("\"4194304\"", "\"4 MiB\"");
        assert!(
            parse(&bad)
                .unwrap_err()
                .to_string()
                .contains("vg_extent_size")
        );
        assert!(ranges("/dev/x:5-2").is_err());
        assert!(ranges("/dev/x").is_err());
    }
}

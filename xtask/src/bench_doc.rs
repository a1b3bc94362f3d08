//! `cargo xtask bench-doc [--json PATH] [--doc PATH] [--check]`: regenerates
//! the tables of docs/benchmarks.md from the JSON results of `cargo xtask
//! bench` (`target/bench/results.json` by default), so that no figure in
//! them is edited by hand.
//!
//! The document marks each generated block with a pair of comments on lines
//! of their own, `<!-- bench:NAME:begin -->` … `<!-- bench:NAME:end -->`;
//! everything between them is replaced, everything outside is left as it
//! is. The names are those of [`SECTIONS`]. The output depends on the JSON
//! alone (no clock, no environment), so running it twice changes nothing.
//! `--check` changes nothing and fails if the document is not up to date.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The generated blocks, by marker name.
pub(crate) const SECTIONS: [&str; 12] = [
    "header",
    "core",
    "fresh",
    "replay",
    "latency",
    "hot-key",
    "architecture",
    "scaling",
    "purge",
    "memory",
    "http",
    "targets",
];

/// Runs `bench-doc` with its arguments.
pub(crate) fn run(args: &[String]) -> Result<(), String> {
    let root = crate::workspace_root();
    let mut json = root.join("target").join("bench").join("results.json");
    let mut doc = root.join("docs").join("benchmarks.md");
    let mut check = false;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => json = path_arg(args.next(), "--json")?,
            "--doc" => doc = path_arg(args.next(), "--doc")?,
            "--check" => check = true,
            other => {
                if let Some(p) = other.strip_prefix("--json=") {
                    json = PathBuf::from(p);
                } else if let Some(p) = other.strip_prefix("--doc=") {
                    doc = PathBuf::from(p);
                } else {
                    return Err(format!(
                        "bench-doc: unexpected argument {other:?} (expected --json PATH, --doc PATH, --check)"
                    ));
                }
            }
        }
    }
    let results = read(&json)?;
    let text = read(&doc)?;
    let report = Json::parse(&results).map_err(|e| format!("{}: {e}", json.display()))?;
    let updated = regenerate(&text, &report).map_err(|e| format!("{}: {e}", doc.display()))?;
    if updated == text {
        eprintln!(
            "xtask: {} is up to date with {}",
            doc.display(),
            json.display()
        );
        return Ok(());
    }
    if check {
        return Err(format!(
            "{} is not up to date with {}: run `cargo xtask bench-doc`",
            doc.display(),
            json.display()
        ));
    }
    std::fs::write(&doc, updated).map_err(|e| format!("cannot write {}: {e}", doc.display()))?;
    eprintln!(
        "xtask: regenerated the tables of {} from {}",
        doc.display(),
        json.display()
    );
    Ok(())
}

fn path_arg(value: Option<&String>, flag: &str) -> Result<PathBuf, String> {
    value
        .map(PathBuf::from)
        .ok_or_else(|| format!("bench-doc: {flag} needs a path"))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// `doc` with every marked block replaced by the one generated from `report`.
///
/// # Behavior
/// A begin marker without its end marker, an end marker without a begin, or
/// an unknown block name is an error; a document without markers is
/// returned unchanged. The generated text sits between a blank line after
/// the begin marker and a blank line before the end marker.
pub(crate) fn regenerate(doc: &str, report: &Json) -> Result<String, String> {
    let blocks = render(report);
    let mut out = String::with_capacity(doc.len());
    let mut lines = doc.split_inclusive('\n').enumerate();
    while let Some((n, line)) = lines.next() {
        if let Some(name) = marker(line, "end") {
            return Err(format!(
                "line {}: end marker of `{name}` without its begin",
                n + 1
            ));
        }
        out.push_str(line);
        let Some(name) = marker(line, "begin") else {
            continue;
        };
        let block = blocks.get(name).ok_or_else(|| {
            format!(
                "line {}: unknown block `{name}` (known: {})",
                n + 1,
                SECTIONS.join(", ")
            )
        })?;
        if !line.ends_with('\n') {
            out.push('\n');
        }
        let end = loop {
            match lines.next() {
                Some((_, l)) if marker(l, "end") == Some(name) => break l,
                Some((m, l)) if marker(l, "begin").is_some() => {
                    return Err(format!(
                        "line {}: a begin marker inside block `{name}` (opened at line {})",
                        m + 1,
                        n + 1
                    ));
                }
                Some(_) => {}
                None => {
                    return Err(format!("line {}: block `{name}` has no end marker", n + 1));
                }
            }
        };
        out.push('\n');
        out.push_str(block);
        out.push('\n');
        out.push_str(end);
    }
    Ok(out)
}

/// The block name of `line` if it is a `<!-- bench:NAME:which -->` marker.
fn marker<'a>(line: &'a str, which: &str) -> Option<&'a str> {
    let inner = line
        .trim()
        .strip_prefix("<!--")?
        .strip_suffix("-->")?
        .trim()
        .strip_prefix("bench:")?;
    inner.strip_suffix(which)?.strip_suffix(':')
}

/// Every block, generated from `report` (each ends with a newline).
fn render(report: &Json) -> BTreeMap<&'static str, String> {
    let measured: Vec<&Json> = report
        .get("backends")
        .map(Json::items)
        .unwrap_or_default()
        .iter()
        .filter(|b| b.str("status") == Some("ok"))
        .collect();
    let mut blocks = BTreeMap::new();
    blocks.insert("header", header(report));
    blocks.insert("core", core(report));
    blocks.insert("fresh", compared(&measured, "fresh"));
    blocks.insert("replay", compared(&measured, "replay"));
    blocks.insert("latency", latency(&measured));
    blocks.insert("hot-key", hot_key(&measured));
    blocks.insert("architecture", architecture(&measured));
    blocks.insert("scaling", scaling(&measured));
    blocks.insert("purge", purge(&measured));
    blocks.insert("memory", memory(&measured));
    blocks.insert("http", http(report));
    blocks.insert("targets", targets(report));
    blocks
}

const NONE: &str = "_Not measured in this run._\n";

fn header(r: &Json) -> String {
    let mut out = String::new();
    let plan = r.get("plan");
    let num = |v: Option<&Json>, key: &str| v.and_then(|v| v.num(key)).unwrap_or(0.0);
    let machine = r.get("machine");
    let _ = writeln!(
        out,
        "Generated by `cargo xtask bench-doc` from the results of `cargo xtask bench` \
         (`target/bench/results.json`); do not edit the figures by hand."
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Run of {} (UTC), {} mode: {} repetition{} of {:.2} s per figure (raw and idem \
         alternating; ratios are the median over the pairs, with their range), outcomes of \
         {} B, {} cores, {} runtime threads, {:.0} s in all.",
        date(r.num("started_at_unix").unwrap_or(0.0)),
        r.str("mode").unwrap_or("?"),
        num(plan, "repetitions"),
        if num(plan, "repetitions") == 1.0 {
            ""
        } else {
            "s"
        },
        num(plan, "seconds_per_measurement"),
        num(plan, "outcome_bytes"),
        num(machine, "cores"),
        num(machine, "runtime_threads"),
        r.num("total_seconds").unwrap_or(0.0),
    );
    let backends = r.get("backends").map(Json::items).unwrap_or_default();
    let mut servers: Vec<&str> = Vec::new();
    for b in backends {
        if let Some(v) = b.str("server_version")
            && !servers.contains(&v)
        {
            servers.push(v);
        }
    }
    if !servers.is_empty() {
        let _ = writeln!(out, "Servers: {}.", servers.join(", "));
    }
    let skipped: Vec<String> = backends
        .iter()
        .filter(|b| b.str("status") == Some("skipped"))
        .map(|b| {
            format!(
                "`{}` ({})",
                b.str("name").unwrap_or("?"),
                b.str("reason").unwrap_or("no reason given")
            )
        })
        .collect();
    if !skipped.is_empty() {
        let _ = writeln!(out, "Not measured: {}.", skipped.join("; "));
    }
    let cached: Vec<String> = backends
        .iter()
        .filter_map(|b| {
            let bytes = b.num("finished_cache_bytes")?;
            Some(format!(
                "`{}` ({:.0} MiB)",
                b.str("name").unwrap_or("?"),
                bytes / 1_048_576.0
            ))
        })
        .collect();
    if !cached.is_empty() {
        let _ = writeln!(
            out,
            "With the engine's finished-record cache: {}.",
            cached.join(", ")
        );
    }
    out
}

fn core(r: &Json) -> String {
    let Some(core) = r.get("core").filter(|c| !c.is_null()) else {
        return NONE.into();
    };
    let mut out = String::from("| pure core, one core | ns per operation |\n|---|--:|\n");
    for part in core.get("parts").map(Json::items).unwrap_or_default() {
        let _ = writeln!(
            out,
            "| {} | {} |",
            part.str("name").unwrap_or("?"),
            group(part.num("ns").unwrap_or(0.0))
        );
    }
    let _ = writeln!(
        out,
        "| **total (one fresh request)** | **{}** |",
        group(core.num("total_ns").unwrap_or(0.0))
    );
    out
}

fn compared(backends: &[&Json], what: &str) -> String {
    let mut out = String::from(
        "| backend | c | idem ÷ raw, median (min–max) | idem op/s | raw op/s | idem p50 µs | raw p50 µs | idem p99 µs | raw p99 µs | idem cpu c+s µs | raw cpu c+s µs |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let mut rows = 0;
    for b in backends {
        let name = b.str("name").unwrap_or("?");
        for row in b.get(what).map(Json::items).unwrap_or_default() {
            let _ = writeln!(out, "| {name} | {} |", compared_cells(row));
            rows += 1;
        }
    }
    if rows == 0 { NONE.into() } else { out }
}

/// `0.84 (0.80–0.88)`, or `0.84` for a single pair, or `–` without a ratio.
fn ratio(row: &Json) -> String {
    let median = row.num("ratio").unwrap_or(0.0);
    if median <= 0.0 {
        return "–".into();
    }
    match (row.num("ratio_min"), row.num("ratio_max")) {
        (Some(lo), Some(hi)) if row.num("repeats").unwrap_or(1.0) > 1.0 => {
            format!("{median:.2} ({lo:.2}–{hi:.2})")
        }
        _ => format!("{median:.2}"),
    }
}

/// Client + server CPU µs per operation, the client's alone, or `–`.
fn cpu(stats: Option<&Json>) -> String {
    let part = |key: &str| stats.and_then(|s| s.num(key));
    match (part("client_cpu_us"), part("server_cpu_us")) {
        (Some(c), Some(s)) => format!("{c:.1}+{s:.1}"),
        (Some(c), None) => format!("{c:.1}"),
        _ => "–".into(),
    }
}

/// p50 and p99 at concurrency 32, with their range over the repetitions.
fn latency(backends: &[&Json]) -> String {
    let mut out = String::from(
        "| backend | workload | idem p50 µs | raw p50 µs | idem p99 µs | raw p99 µs |\n\
         |---|---|--:|--:|--:|--:|\n",
    );
    let mut rows = 0;
    for b in backends {
        for what in ["fresh", "replay"] {
            for row in b.get(what).map(Json::items).unwrap_or_default() {
                if row.num("concurrency") != Some(32.0) {
                    continue;
                }
                let repeated = row.num("repeats").unwrap_or(1.0) > 1.0;
                let cell = |side: &str, q: &str| {
                    let median = row
                        .get(side)
                        .and_then(|s| s.num(&format!("{q}_us")))
                        .unwrap_or(0.0);
                    let spread = row.get(&format!("{side}_spread"));
                    let lo = spread.and_then(|s| s.num(&format!("{q}_us_min")));
                    let hi = spread.and_then(|s| s.num(&format!("{q}_us_max")));
                    match (lo, hi) {
                        (Some(lo), Some(hi)) if repeated => {
                            format!("{} ({}–{})", micros(median), micros(lo), micros(hi))
                        }
                        _ => micros(median),
                    }
                };
                let _ = writeln!(
                    out,
                    "| {} | {what} | {} | {} | {} | {} |",
                    b.str("name").unwrap_or("?"),
                    cell("idem", "p50"),
                    cell("raw", "p50"),
                    cell("idem", "p99"),
                    cell("raw", "p99"),
                );
                rows += 1;
            }
        }
    }
    if rows == 0 { NONE.into() } else { out }
}

fn hot_key(backends: &[&Json]) -> String {
    let mut out = String::from(
        "| backend | side | rounds × tasks | executions | rounds with exactly one | loser p50 µs | loser p99 µs | winner p50 µs | rounds/s |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let mut rows = 0;
    for b in backends {
        let Some(pair) = b.get("hot_key").filter(|h| !h.is_null()) else {
            continue;
        };
        for side in ["idem", "raw"] {
            let Some(h) = pair.get(side) else { continue };
            let n = |key: &str| h.num(key).unwrap_or(0.0);
            let errors = n("errors");
            let _ = writeln!(
                out,
                "| {} | {side} | {} × {} | {}{} | {} | {} | {} | {} | {} |",
                b.str("name").unwrap_or("?"),
                n("rounds"),
                n("tasks"),
                n("executions"),
                if errors > 0.0 {
                    format!(" ({errors} errors)")
                } else {
                    String::new()
                },
                n("rounds_with_one_execution"),
                micros(n("loser_p50_us")),
                micros(n("loser_p99_us")),
                micros(n("winner_p50_us")),
                group(n("rounds_per_sec")),
            );
            rows += 1;
        }
    }
    if rows == 0 { NONE.into() } else { out }
}

fn architecture(backends: &[&Json]) -> String {
    let mut out = String::from(
        "| backend | variant | workload | c | variant op/s | variant p50 µs | fair raw op/s | fair raw p50 µs | idem op/s | idem p50 µs |\n\
         |---|---|---|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let mut rows = 0;
    for b in backends {
        for v in b.get("architecture").map(Json::items).unwrap_or_default() {
            for row in v.get("rows").map(Json::items).unwrap_or_default() {
                let stat =
                    |side: &str, key: &str| row.get(side).and_then(|s| s.num(key)).unwrap_or(0.0);
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    b.str("name").unwrap_or("?"),
                    v.str("label").unwrap_or("?"),
                    row.str("workload").unwrap_or("?"),
                    row.num("concurrency").unwrap_or(0.0),
                    group(stat("variant", "ops_per_sec")),
                    micros(stat("variant", "p50_us")),
                    group(stat("raw", "ops_per_sec")),
                    micros(stat("raw", "p50_us")),
                    group(stat("idem", "ops_per_sec")),
                    micros(stat("idem", "p50_us")),
                );
                rows += 1;
            }
        }
    }
    if rows == 0 { NONE.into() } else { out }
}

fn scaling(backends: &[&Json]) -> String {
    let mut out = String::from(
        "| backend | c | live records, few → many | idem op/s, few → many | idem ratio | raw op/s, few → many | raw ratio | bulk load s |\n\
         |---|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let mut rows = 0;
    for b in backends {
        let Some(s) = b.get("scaling").filter(|s| !s.is_null()) else {
            continue;
        };
        let ops = |key: &str| s.get(key).and_then(|v| v.num("ops_per_sec")).unwrap_or(0.0);
        let n = |key: &str| s.num(key).unwrap_or(0.0);
        let _ = writeln!(
            out,
            "| {} | {} | {} → {} | {} → {} | {:.2} | {} → {} | {:.2} | {:.1} |",
            b.str("name").unwrap_or("?"),
            n("concurrency"),
            group(n("small_records")),
            group(n("large_records")),
            group(ops("small")),
            group(ops("large")),
            n("ratio"),
            group(ops("raw_small")),
            group(ops("raw_large")),
            n("raw_ratio"),
            n("load_seconds"),
        );
        rows += 1;
    }
    if rows == 0 { NONE.into() } else { out }
}

fn purge(backends: &[&Json]) -> String {
    let mut out = String::from(
        "| backend | expired records | removed | batch | seconds | rows/s |\n\
         |---|--:|--:|--:|--:|--:|\n",
    );
    let mut rows = 0;
    for b in backends {
        let Some(p) = b.get("purge").filter(|p| !p.is_null()) else {
            continue;
        };
        let name = b.str("name").unwrap_or("?");
        let n = |key: &str| p.num(key).unwrap_or(0.0);
        if p.get("native_expiry").and_then(Json::as_bool) == Some(true) {
            let _ = writeln!(out, "| {name} | native expiry: nothing to purge | | | | |");
        } else {
            let _ = writeln!(
                out,
                "| {name} | {} | {} | {} | {:.2} | {} |",
                group(n("records")),
                group(n("removed")),
                group(n("batch")),
                n("seconds"),
                group(n("rows_per_sec")),
            );
        }
        rows += 1;
    }
    if rows == 0 { NONE.into() } else { out }
}

fn memory(backends: &[&Json]) -> String {
    let mut out = String::from(
        "| backend | records | idem B per record beyond the outcome | raw B per value beyond the value | idem − raw B | counted as |\n\
         |---|--:|--:|--:|--:|---|\n",
    );
    let mut rows = 0;
    for b in backends {
        let Some(m) = b.get("memory").filter(|m| !m.is_null()) else {
            continue;
        };
        let n = |key: &str| m.num(key).unwrap_or(0.0);
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.0} | {:.0} | {} |",
            b.str("name").unwrap_or("?"),
            group(n("records")),
            n("idem_overhead_bytes"),
            n("raw_overhead_bytes"),
            n("idem_minus_raw_bytes"),
            m.str("method").unwrap_or(""),
        );
        rows += 1;
    }
    if rows == 0 { NONE.into() } else { out }
}

/// The HTTP measurement: `idem-tower` on axum over each store, against the
/// bare endpoint (`idem` is the layered server, `raw` the bare one).
fn http(r: &Json) -> String {
    let mut out = String::from(
        "| store | workload | c | with ÷ without layer, median (min–max) | with op/s | without op/s | with p50 µs | without p50 µs | with p99 µs | without p99 µs | with cpu µs | without cpu µs |\n\
         |---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
    );
    let mut rows = 0;
    let stores = r.get("http").and_then(|h| h.get("stores"));
    for store in stores.map(Json::items).unwrap_or_default() {
        let name = store.str("name").unwrap_or("?");
        for what in ["fresh", "replay"] {
            for row in store.get(what).map(Json::items).unwrap_or_default() {
                let _ = writeln!(out, "| {name} | {what} | {} |", compared_cells(row));
                rows += 1;
            }
        }
    }
    if rows == 0 { NONE.into() } else { out }
}

/// The cells of one compared row (`idem` against `raw`), joined by ` | `:
/// concurrency, ratio, op/s, p50, p99 and CPU, each for both sides.
fn compared_cells(row: &Json) -> String {
    let (idem, raw) = (row.get("idem"), row.get("raw"));
    let stat = |s: Option<&Json>, key: &str| s.and_then(|s| s.num(key)).unwrap_or(0.0);
    [
        row.num("concurrency").unwrap_or(0.0).to_string(),
        ratio(row),
        group(stat(idem, "ops_per_sec")),
        group(stat(raw, "ops_per_sec")),
        micros(stat(idem, "p50_us")),
        micros(stat(raw, "p50_us")),
        micros(stat(idem, "p99_us")),
        micros(stat(raw, "p99_us")),
        cpu(idem),
        cpu(raw),
    ]
    .join(" | ")
}

fn targets(r: &Json) -> String {
    let mut out =
        String::from("| measured | target | this run, median (min–max) | |\n|---|---|--:|---|\n");
    let mut rows = 0;
    for t in r.get("targets").map(Json::items).unwrap_or_default() {
        let value = t.num("value").unwrap_or(0.0);
        let value = match (t.num("min"), t.num("max")) {
            (Some(lo), Some(hi)) => format!("{value:.2} ({lo:.2}–{hi:.2})"),
            _ => format!("{value:.2}"),
        };
        let met = t.get("met").and_then(Json::as_bool) == Some(true);
        let _ = writeln!(
            out,
            "| {} | {} | {value} | {} |",
            t.str("name").unwrap_or("?"),
            t.str("target")
                .unwrap_or("?")
                .replace(">=", "≥")
                .replace("<=", "≤"),
            if met { "met" } else { "**missed**" },
        );
        rows += 1;
    }
    if rows == 0 { NONE.into() } else { out }
}

/// A latency in µs: one decimal below 100 µs (`63.8`), whole microseconds
/// with thousands separators above (`1,638`).
fn micros(us: f64) -> String {
    if us < 100.0 {
        format!("{us:.1}")
    } else {
        group(us)
    }
}

/// A whole number with thousands separators (`14,768`), rounded.
fn group(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < 0.0 && digits != "0" {
        out.insert(0, '-');
    }
    out
}

/// `YYYY-MM-DD` of a Unix time in seconds (UTC).
fn date(unix_secs: f64) -> String {
    // Howard Hinnant's civil_from_days.
    let days = (unix_secs.max(0.0) / 86_400.0).floor() as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// A JSON value: just enough of JSON to read the benchmark results (xtask
/// has no dependencies).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    /// Members in document order.
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// Parses one JSON document (whitespace around it allowed).
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut p = Parser {
            bytes: text.as_bytes(),
            at: 0,
        };
        let value = p.value(0)?;
        p.space();
        if p.at != p.bytes.len() {
            return Err(p.error("trailing characters"));
        }
        Ok(value)
    }

    fn get(&self, key: &str) -> Option<&Self> {
        match self {
            Self::Obj(members) => members.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn items(&self) -> &[Self] {
        match self {
            Self::Arr(items) => items,
            _ => &[],
        }
    }

    fn is_null(&self) -> bool {
        matches!(self, Self::Null)
    }

    fn as_bool(&self) -> Option<bool> {
        match self {
            Self::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The number under `key`.
    fn num(&self, key: &str) -> Option<f64> {
        match self.get(key)? {
            Self::Num(n) => Some(*n),
            _ => None,
        }
    }

    /// The string under `key`.
    fn str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }
}

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> String {
        format!("invalid JSON at byte {}: {what}", self.at)
    }

    fn space(&mut self) {
        while self
            .bytes
            .get(self.at)
            .is_some_and(|b| b.is_ascii_whitespace())
        {
            self.at += 1;
        }
    }

    fn eat(&mut self, literal: &str) -> bool {
        if self.bytes[self.at..].starts_with(literal.as_bytes()) {
            self.at += literal.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > 64 {
            return Err(self.error("nested too deeply"));
        }
        self.space();
        match self.bytes.get(self.at) {
            None => Err(self.error("unexpected end")),
            Some(b'{') => {
                self.at += 1;
                let mut members = Vec::new();
                self.space();
                if self.eat("}") {
                    return Ok(Json::Obj(members));
                }
                loop {
                    self.space();
                    let key = self.string()?;
                    self.space();
                    if !self.eat(":") {
                        return Err(self.error("expected `:`"));
                    }
                    members.push((key, self.value(depth + 1)?));
                    self.space();
                    if self.eat("}") {
                        return Ok(Json::Obj(members));
                    }
                    if !self.eat(",") {
                        return Err(self.error("expected `,` or `}`"));
                    }
                }
            }
            Some(b'[') => {
                self.at += 1;
                let mut items = Vec::new();
                self.space();
                if self.eat("]") {
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.space();
                    if self.eat("]") {
                        return Ok(Json::Arr(items));
                    }
                    if !self.eat(",") {
                        return Err(self.error("expected `,` or `]`"));
                    }
                }
            }
            Some(b'"') => self.string().map(Json::Str),
            Some(_) if self.eat("null") => Ok(Json::Null),
            Some(_) if self.eat("true") => Ok(Json::Bool(true)),
            Some(_) if self.eat("false") => Ok(Json::Bool(false)),
            Some(_) => self.number(),
        }
    }

    fn number(&mut self) -> Result<Json, String> {
        let start = self.at;
        while self
            .bytes
            .get(self.at)
            .is_some_and(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
        {
            self.at += 1;
        }
        std::str::from_utf8(&self.bytes[start..self.at])
            .ok()
            .filter(|s| !s.is_empty())
            .and_then(|s| s.parse::<f64>().ok())
            .map(Json::Num)
            .ok_or_else(|| {
                self.at = start;
                self.error("expected a value")
            })
    }

    fn string(&mut self) -> Result<String, String> {
        if !self.eat("\"") {
            return Err(self.error("expected a string"));
        }
        let mut out = Vec::new();
        loop {
            let Some(&b) = self.bytes.get(self.at) else {
                return Err(self.error("unterminated string"));
            };
            self.at += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.bytes.get(self.at) else {
                        return Err(self.error("unterminated escape"));
                    };
                    self.at += 1;
                    let c = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return Err(self.error("unknown escape")),
                    };
                    let mut buf = [0; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                _ => out.push(b),
            }
        }
        String::from_utf8(out).map_err(|_| self.error("a string that is not UTF-8"))
    }

    /// The character of a `\uXXXX` escape (a surrogate pair takes two).
    fn unicode_escape(&mut self) -> Result<char, String> {
        let high = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&high) {
            if !self.eat("\\u") {
                return Err(self.error("a lone surrogate"));
            }
            let low = self.hex4()?;
            if !(0xDC00..0xE000).contains(&low) {
                return Err(self.error("a lone surrogate"));
            }
            0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
        } else {
            high
        };
        char::from_u32(code).ok_or_else(|| self.error("an invalid code point"))
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let digits = self
            .bytes
            .get(self.at..self.at + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u32::from_str_radix(d, 16).ok())
            .ok_or_else(|| self.error("expected four hex digits"))?;
        self.at += 4;
        Ok(digits)
    }
}

#[cfg(test)]
mod tests {
    use super::{Json, SECTIONS, date, group, micros, regenerate};

    /// A small results file in the layout `idem-bench` writes (format 2).
    const FIXTURE: &str = r#"{
  "format": 2,
  "mode": "quick",
  "started_at_unix": 1796083200,
  "total_seconds": 61.5,
  "machine": {"cores": 2, "os": "linux/x86_64", "runtime_threads": 2},
  "plan": {"seconds_per_measurement": 0.2, "max_ops_per_measurement": null,
           "repetitions": 2, "outcome_bytes": 1024, "replay_keys": 1000,
           "hot_key_tasks": 64, "hot_key_rounds": 20, "scaling_records": [10000, 100000],
           "purge_records": 10000, "memory_records": 1000},
  "core": {"parts": [{"name": "key parse (36-byte UUID)", "ns": 35.2}], "total_ns": 1964.4},
  "backends": [
    {"name": "sqlite", "status": "ok", "server_version": "SQLite 3.46.0",
     "fresh": [{"concurrency": 32,
                "idem": {"ops": 10, "errors": 0, "seconds": 1.0, "ops_per_sec": 14768.2,
                         "p50_us": 1638.44, "p99_us": 9035.8, "mean_us": 1.0,
                         "client_cpu_us": 53.7},
                "raw": {"ops": 10, "errors": 0, "seconds": 1.0, "ops_per_sec": 14948.0,
                        "p50_us": 1564.7, "p99_us": 10477.6, "mean_us": 1.0},
                "ratio": 0.99, "ratio_min": 0.95, "ratio_max": 1.02, "repeats": 2,
                "ratios": [0.95, 1.02], "idem_reps": [14000.0, 15000.0],
                "raw_reps": [14700.0, 14900.0],
                "idem_spread": {"ops_per_sec_min": 14000.0, "ops_per_sec_max": 15000.0,
                                "p50_us_min": 1600.0, "p50_us_max": 1700.0,
                                "p99_us_min": 9000.0, "p99_us_max": 9100.0},
                "raw_spread": {"ops_per_sec_min": 14700.0, "ops_per_sec_max": 14900.0,
                               "p50_us_min": 1500.0, "p50_us_max": 1600.0,
                               "p99_us_min": 10000.0, "p99_us_max": 11000.0}}],
     "replay": [], "hot_key": null, "architecture": [], "scaling": null,
     "purge": {"native_expiry": false, "records": 10000, "removed": 10000, "batch": 1000,
               "seconds": 0.14, "rows_per_sec": 71344.3},
     "memory": {"records": 1000, "outcome_bytes": 1024, "idem_overhead_bytes": 407.2,
                "raw_overhead_bytes": 408.0, "idem_minus_raw_bytes": -0.8,
                "method": "growth of the used pages"},
     "notes": ["a note with \"quotes\" and \u00e9"], "errors": []},
    {"name": "valkey", "status": "skipped", "reason": "IDEM_VALKEY_URL is not set",
     "fresh": [], "replay": [], "hot_key": null, "architecture": [], "scaling": null,
     "purge": null, "memory": null, "notes": [], "errors": []}
  ],
  "http": {"request_bytes": 57, "replay_keys": 1000, "notes": [], "errors": [],
           "stores": [{"name": "memory", "fresh_handler_runs": 10, "replay_handler_runs": 0,
                       "errors": [], "replay": [],
                       "fresh": [{"concurrency": 8,
                                  "idem": {"ops": 10, "errors": 0, "seconds": 1.0,
                                           "ops_per_sec": 4210.4, "p50_us": 1790.2,
                                           "p99_us": 4100.0, "mean_us": 1.0,
                                           "client_cpu_us": 410.5},
                                  "raw": {"ops": 10, "errors": 0, "seconds": 1.0,
                                          "ops_per_sec": 5120.0, "p50_us": 1480.6,
                                          "p99_us": 3900.0, "mean_us": 1.0,
                                          "client_cpu_us": 350.2},
                                  "ratio": 0.82, "ratio_min": 0.8, "ratio_max": 0.84,
                                  "repeats": 2}]}]},
  "targets": [{"name": "sqlite fresh c=32 idem/raw", "target": ">= 0.90", "value": 0.99,
               "min": 0.95, "max": 1.02, "met": true}]
}"#;

    const DOC: &str = "# Benchmarks\n\nProse stays.\n\n<!-- bench:header:begin -->\nold\n<!-- bench:header:end -->\n\nMore prose.\n<!-- bench:fresh:begin -->\n| old | table |\n<!-- bench:fresh:end -->\n<!-- bench:latency:begin -->\n<!-- bench:latency:end -->\nEnd.\n";

    #[test]
    fn regenerating_twice_changes_nothing() {
        let report = Json::parse(FIXTURE).unwrap();
        let once = regenerate(DOC, &report).unwrap();
        let twice = regenerate(&once, &report).unwrap();
        assert_eq!(once, twice);
        assert!(
            once.starts_with("# Benchmarks\n\nProse stays.\n\n<!-- bench:header:begin -->\n\n")
        );
        assert!(once.contains("\nMore prose.\n<!-- bench:fresh:begin -->\n"));
        assert!(once.ends_with("<!-- bench:latency:end -->\nEnd.\n"));
        assert!(!once.contains("old"), "{once}");
        assert!(
            once.contains("| sqlite | 32 | 0.99 (0.95–1.02) | 14,768 | 14,948 | 1,638 | 1,565 | 9,036 | 10,478 | 53.7 | – |"),
            "{once}"
        );
        assert!(
            once.contains("| sqlite | fresh | 1,638 (1,600–1,700) | 1,565 (1,500–1,600) | 9,036 (9,000–9,100) | 10,478 (10,000–11,000) |"),
            "{once}"
        );
        assert!(
            once.contains("Run of 2026-12-01 (UTC), quick mode: 2 repetitions of 0.20 s"),
            "{once}"
        );
        assert!(once.contains("Servers: SQLite 3.46.0."), "{once}");
        assert!(
            once.contains("Not measured: `valkey` (IDEM_VALKEY_URL is not set)."),
            "{once}"
        );
    }

    #[test]
    fn every_block_renders_from_the_fixture() {
        let report = Json::parse(FIXTURE).unwrap();
        let mut doc = String::new();
        for name in SECTIONS {
            doc.push_str(&format!(
                "<!-- bench:{name}:begin -->\n<!-- bench:{name}:end -->\n"
            ));
        }
        let out = regenerate(&doc, &report).unwrap();
        assert!(
            out.contains("| **total (one fresh request)** | **1,964** |"),
            "{out}"
        );
        assert!(
            out.contains("| sqlite | 10,000 | 10,000 | 1,000 | 0.14 | 71,344 |"),
            "{out}"
        );
        assert!(
            out.contains("| sqlite | 1,000 | 407 | 408 | -1 | growth of the used pages |"),
            "{out}"
        );
        assert!(
            out.contains("| sqlite fresh c=32 idem/raw | ≥ 0.90 | 0.99 (0.95–1.02) | met |"),
            "{out}"
        );
        assert!(
            out.contains("| memory | fresh | 8 | 0.82 (0.80–0.84) | 4,210 | 5,120 | 1,790 | 1,481 | 4,100 | 3,900 | 410.5 | 350.2 |"),
            "{out}"
        );
        // Nothing measured: said so, not an empty table.
        assert!(out.contains("<!-- bench:scaling:begin -->\n\n_Not measured in this run._\n\n<!-- bench:scaling:end -->"), "{out}");
        assert_eq!(regenerate(&out, &report).unwrap(), out);
    }

    #[test]
    fn broken_markers_are_errors_and_no_markers_change_nothing() {
        let report = Json::parse(FIXTURE).unwrap();
        assert_eq!(regenerate("no markers\n", &report).unwrap(), "no markers\n");
        for bad in [
            "<!-- bench:fresh:begin -->\nno end\n",
            "<!-- bench:fresh:end -->\n",
            "<!-- bench:nonsense:begin -->\n<!-- bench:nonsense:end -->\n",
            "<!-- bench:fresh:begin -->\n<!-- bench:replay:begin -->\n<!-- bench:replay:end -->\n<!-- bench:fresh:end -->\n",
        ] {
            assert!(regenerate(bad, &report).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_json_as_serde_json_writes_it() {
        let v = Json::parse(r#" {"a": [1, -2.5e-3, true, null], "b": "x\u00e9\ud83d\ude00\n"} "#)
            .unwrap();
        assert_eq!(
            v,
            Json::Obj(vec![
                (
                    "a".into(),
                    Json::Arr(vec![
                        Json::Num(1.0),
                        Json::Num(-0.0025),
                        Json::Bool(true),
                        Json::Null
                    ])
                ),
                ("b".into(), Json::Str("xé😀\n".into())),
            ])
        );
        for bad in ["", "{", "[1,]", "{\"a\" 1}", "\"\\ud800\"", "1 2", "nul"] {
            assert!(Json::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn numbers_and_dates() {
        assert_eq!(group(14768.4), "14,768");
        assert_eq!(group(999.5), "1,000");
        assert_eq!(group(12.0), "12");
        assert_eq!(group(-1234.0), "-1,234");
        assert_eq!(group(-0.2), "0");
        assert_eq!(micros(63.84), "63.8");
        assert_eq!(micros(1638.44), "1,638");
        assert_eq!(date(0.0), "1970-01-01");
        assert_eq!(date(951_782_400.0), "2000-02-29");
        assert_eq!(date(1_796_083_200.0), "2026-12-01");
    }
}

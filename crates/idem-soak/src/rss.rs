//! The process's resident set size, from `/proc/self/statm`.

use crate::SoakError;

/// The resident set size of this process, in bytes.
///
/// # Behavior
/// Reads the second field of `/proc/self/statm` (resident pages) and
/// multiplies it by the page size, which it takes from `/proc/self/smaps`'s
/// `KernelPageSize` of the first mapping (4 KiB on x86-64 and most arm64
/// kernels; no libc call, so no `unsafe`). Linux only: elsewhere an error.
pub(crate) fn resident_bytes() -> Result<u64, SoakError> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages = parse_statm(&statm).ok_or_else(|| SoakError::Proc(format!("statm: {statm:?}")))?;
    Ok(pages * page_size())
}

/// Resident pages: the second field of `statm`.
fn parse_statm(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// The page size in bytes (read once).
fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        std::fs::read_to_string("/proc/self/smaps")
            .ok()
            .and_then(|smaps| parse_kernel_page_size(&smaps))
            .unwrap_or(4096)
    })
}

/// The first `KernelPageSize:` of an smaps listing, in bytes.
fn parse_kernel_page_size(smaps: &str) -> Option<u64> {
    let line = smaps.lines().find(|l| l.starts_with("KernelPageSize:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next()? {
        "kB" => Some(value * 1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_formats() {
        assert_eq!(parse_statm("1234 567 89 1 0 300 0\n"), Some(567));
        assert_eq!(parse_statm(""), None);
        assert_eq!(parse_statm("1 x"), None);
        let smaps =
            "55d0-55d1 r--p 00000000 08:01 1 /bin/x\nSize: 4 kB\nKernelPageSize:        4 kB\n";
        assert_eq!(parse_kernel_page_size(smaps), Some(4096));
        assert_eq!(parse_kernel_page_size("Size: 4 kB\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let rss = resident_bytes().unwrap_or(0);
        // A running test binary holds at least a megabyte.
        assert!(rss > 1 << 20, "{rss}");
    }
}

//! Value parsers of the admin commands: volume names, sizes, rates and removable limits.

use common::admin::validate_name;
use common::units::ByteSize;
use std::str::FromStr;

/// Volume sizes are multiples of this.
pub const SIZE_ALIGN: u64 = 4096;

/// A volume name (`A-Z a-z 0-9 . _ -`, 1 to 64 characters).
pub fn volume_name(s: &str) -> Result<String, String> {
    validate_name(s)?;
    Ok(s.to_string())
}

/// A volume size: `10G`, `512MiB`, `1073741824`; positive and a multiple of 4 KiB.
pub fn volume_size(s: &str) -> Result<u64, String> {
    let size = ByteSize::from_str(s).map_err(|e| e.to_string())?.bytes();
    if size == 0 {
        return Err("a volume needs a size above 0".to_string());
    }
    if !size.is_multiple_of(SIZE_ALIGN) {
        let up = size.div_ceil(SIZE_ALIGN).saturating_mul(SIZE_ALIGN);
        return Err(format!(
            "{size} bytes is not a multiple of 4096 (4KiB); use e.g. {up}"
        ));
    }
    Ok(size)
}

/// A rate in ops per second: at least 1.
pub fn ops_rate(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => {
            Err("a rate of 0 would stop the volume; leave the option out for no limit".to_string())
        }
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a number of operations per second")),
    }
}

/// A bandwidth in bytes per second (`100MiB`, `1G`, plain bytes): at least 1.
pub fn bandwidth(s: &str) -> Result<u64, String> {
    match ByteSize::from_str(s).map_err(|e| e.to_string())?.bytes() {
        0 => Err(
            "a bandwidth of 0 would stop the volume; leave the option out for no limit".to_string(),
        ),
        n => Ok(n),
    }
}

/// A limit that `none` removes (sent as JSON `null`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub Option<u64>);

fn is_none_word(s: &str) -> bool {
    s.trim().eq_ignore_ascii_case("none")
}

/// An ops rate or `none`.
pub fn ops_limit(s: &str) -> Result<Limit, String> {
    if is_none_word(s) {
        return Ok(Limit(None));
    }
    ops_rate(s)
        .map(|n| Limit(Some(n)))
        .map_err(|e| format!("{e} (or `none` to remove the limit)"))
}

/// A bandwidth or `none`.
pub fn bandwidth_limit(s: &str) -> Result<Limit, String> {
    if is_none_word(s) {
        return Ok(Limit(None));
    }
    bandwidth(s)
        .map(|n| Limit(Some(n)))
        .map_err(|e| format!("{e} (or `none` to remove the limit)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(volume_size("10G"), Ok(10 << 30));
        assert_eq!(volume_size("512MiB"), Ok(512 << 20));
        assert_eq!(volume_size("8192"), Ok(8192));
        assert_eq!(volume_size(" 1 TiB"), Ok(1 << 40));
        let e = volume_size("1000").unwrap_err();
        assert!(e.contains("1000 bytes is not a multiple of 4096"), "{e}");
        assert!(e.contains("use e.g. 4096"), "{e}");
        assert!(volume_size("0").unwrap_err().contains("above 0"));
        assert!(volume_size("10X").unwrap_err().contains("invalid size"));
        assert!(volume_size("").is_err());
        assert!(volume_size("-1G").is_err());
    }

    #[test]
    fn rates_and_limits() {
        assert_eq!(ops_rate("3000"), Ok(3000));
        assert!(ops_rate("0").unwrap_err().contains("leave the option out"));
        assert!(ops_rate("fast").is_err());
        assert!(ops_rate("-5").is_err());
        assert_eq!(bandwidth("100MiB"), Ok(100 << 20));
        assert_eq!(bandwidth("1000"), Ok(1000));
        assert!(bandwidth("0").is_err());
        assert_eq!(ops_limit("none"), Ok(Limit(None)));
        assert_eq!(ops_limit("NONE"), Ok(Limit(None)));
        assert_eq!(ops_limit("500"), Ok(Limit(Some(500))));
        assert!(ops_limit("0").unwrap_err().contains("`none`"));
        assert!(ops_limit("nil").is_err());
        assert_eq!(bandwidth_limit("none"), Ok(Limit(None)));
        assert_eq!(bandwidth_limit("1G"), Ok(Limit(Some(1 << 30))));
        assert!(
            bandwidth_limit("lots")
                .unwrap_err()
                .contains("invalid size")
        );
    }

    #[test]
    fn names() {
        assert_eq!(volume_name("db-1"), Ok("db-1".to_string()));
        assert!(volume_name("a/b").is_err());
        assert!(volume_name("-x").is_err());
    }
}

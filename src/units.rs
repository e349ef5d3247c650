//! Parsing and printing of sizes as users write them (`10G`, `512M`), binary units,
//! the way `rbd` and Docker users expect.

/// Parses `N[K|M|G|T|P]` with an optional `i`/`iB`/`B` suffix; a bare number is bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("empty size; write it like 10G, 512M or 1T".into());
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err("a size starts with a whole number, like 10G, 512M or 1T".into());
    }
    let number: u64 = t[..digits_end]
        .parse()
        .map_err(|_| "number too large".to_string())?;
    let unit = t[digits_end..].trim();
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KI" | "KIB" => 10,
        "M" | "MB" | "MI" | "MIB" => 20,
        "G" | "GB" | "GI" | "GIB" => 30,
        "T" | "TB" | "TI" | "TIB" => 40,
        "P" | "PB" | "PI" | "PIB" => 50,
        _ => {
            return Err(format!(
                "unknown unit {unit:?}; use K, M, G, T or P (binary: 1G = 1024M)"
            ))
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| "size too large".to_string())
}

/// Formats bytes in the largest binary unit that keeps one decimal place honest.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{} {}", value as u64, UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1Ti"), Ok(1 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size(" 3g "), Ok(3 << 30));
    }

    #[test]
    fn bad_sizes_are_refused_with_a_hint() {
        for bad in [
            "",
            "ten",
            "10X",
            "-1",
            "1e30",
            "1.5G",
            "99999999999999999999",
            "16777216P",
        ] {
            let err = parse_size(bad).unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        assert!(parse_size("10X").unwrap_err().contains("K, M, G, T or P"));
    }

    #[test]
    fn sizes_format_readably() {
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(1536 << 20), "1.5 GiB");
        assert_eq!(format_size(100), "100 B");
    }
}

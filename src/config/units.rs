//! Parsing of the small value languages users type: weights ("5%", "0.5%", basis points),
//! durations ("10s", "250ms") and sizes ("32MiB"). Parsing is exact: no float rounding decides
//! which basis point a percentage lands on.

use std::time::Duration;

/// The largest weight: 100% in basis points.
pub const MAX_BASIS_POINTS: u16 = 10_000;

/// Parses a percentage such as `5`, `5%`, `0.5%` or `12.25%` into basis points.
///
/// A bare number is a percentage here (this is what CLI flags and the admin API take). At most
/// two decimals are accepted, since one basis point is 0.01%.
pub fn parse_percent(input: &str) -> Result<u16, String> {
    let text = input.trim();
    let number = text.strip_suffix('%').unwrap_or(text).trim();
    let expected = || {
        format!(
            "expected a percentage between 0% and 100% such as \"5%\" or \"0.5%\", got {input:?}"
        )
    };
    if number.is_empty() {
        return Err(expected());
    }
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() && fraction.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return Err(expected());
    }
    if fraction.len() > 2 && fraction[2..].bytes().any(|b| b != b'0') {
        return Err(format!(
            "{input:?} is finer than one basis point (0.01%); use at most two decimals"
        ));
    }
    let whole: u32 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| expected())?
    };
    let mut hundredths = 0u32;
    for (i, digit) in fraction.bytes().take(2).enumerate() {
        hundredths += u32::from(digit - b'0') * if i == 0 { 10 } else { 1 };
    }
    let basis_points = whole.saturating_mul(100).saturating_add(hundredths);
    if basis_points > u32::from(MAX_BASIS_POINTS) {
        return Err(expected());
    }
    Ok(basis_points as u16)
}

/// Formats basis points as a percentage for people: 50 → "0.5%", 500 → "5%".
pub fn format_percent(basis_points: u16) -> String {
    let whole = basis_points / 100;
    let frac = basis_points % 100;
    match frac {
        0 => format!("{whole}%"),
        f if f % 10 == 0 => format!("{whole}.{}%", f / 10),
        f => format!("{whole}.{f:02}%"),
    }
}

/// Parses a duration such as `10s`, `250ms` or `1m 30s`.
pub fn parse_duration(input: &str) -> Result<Duration, String> {
    humantime::parse_duration(input.trim()).map_err(|e| {
        format!("expected a duration such as \"10s\" or \"250ms\", got {input:?} ({e})")
    })
}

/// Parses a size such as `32MiB`, `1 MB` or `4096` (bytes).
pub fn parse_size(input: &str) -> Result<u64, String> {
    input
        .trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|_| format!("expected a size such as \"32MiB\" or \"4096\", got {input:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_become_exact_basis_points() {
        assert_eq!(parse_percent("5"), Ok(500));
        assert_eq!(parse_percent("5%"), Ok(500));
        assert_eq!(parse_percent("0.5%"), Ok(50));
        assert_eq!(parse_percent(".5%"), Ok(50));
        assert_eq!(parse_percent("12.25%"), Ok(1225));
        assert_eq!(parse_percent("0.01%"), Ok(1));
        assert_eq!(parse_percent("0.010%"), Ok(1));
        assert_eq!(parse_percent("100%"), Ok(10_000));
        assert_eq!(parse_percent(" 0 % "), Ok(0));
    }

    #[test]
    fn bad_percentages_are_refused_with_the_input_named() {
        for bad in [
            "", "%", "150%", "-1%", "abc", "5%%", "1e2", "0.005%", "1.2.3", ".",
        ] {
            let err = parse_percent(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }

    #[test]
    fn percentages_format_back() {
        for bp in [0u16, 1, 10, 50, 500, 1225, 10_000] {
            assert_eq!(parse_percent(&format_percent(bp)), Ok(bp));
        }
        assert_eq!(format_percent(50), "0.5%");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_size("32MiB"), Ok(32 * 1024 * 1024));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("lots").is_err());
    }
}

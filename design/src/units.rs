//! Human units for budgets: `11.7M`, `1.8G`, `390M`, `25557032`, `2.5e6`.

use crate::error::DesignError;

/// Parses a count with an optional K/M/G/T suffix (powers of 1000), naming `field` on error.
pub fn parse_count(field: &'static str, text: &str) -> Result<u64, DesignError> {
    let invalid = |reason: String| DesignError::InvalidInput { field, reason };
    let trimmed = text.trim().replace('_', "");
    let (number, scale) = match trimmed.chars().last() {
        Some('k' | 'K') => (&trimmed[..trimmed.len() - 1], 1e3),
        Some('m' | 'M') => (&trimmed[..trimmed.len() - 1], 1e6),
        Some('g' | 'G' | 'b' | 'B') => (&trimmed[..trimmed.len() - 1], 1e9),
        Some('t' | 'T') => (&trimmed[..trimmed.len() - 1], 1e12),
        _ => (trimmed.as_str(), 1.0),
    };
    let value: f64 = number.parse().map_err(|_| {
        invalid(format!(
            "{text:?} is not a number like 11.7M, 1.8G or 390000"
        ))
    })?;
    let scaled = value * scale;
    if !scaled.is_finite() || scaled <= 0.0 || scaled > 1e15 {
        return Err(invalid(format!(
            "{text:?} must be positive and at most 1e15"
        )));
    }
    Ok(scaled.round() as u64)
}

/// Formats a count the way people read budgets: `11.69M`, `1.82G`, `950K`.
pub fn format_count(value: u64) -> String {
    let value = value as f64;
    if value >= 1e9 {
        format!("{:.2}G", value / 1e9)
    } else if value >= 1e6 {
        format!("{:.2}M", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1}K", value / 1e3)
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_count("params", "11.7M").unwrap(), 11_700_000);
        assert_eq!(parse_count("flops", "1.8G").unwrap(), 1_800_000_000);
        assert_eq!(parse_count("flops", "390m").unwrap(), 390_000_000);
        assert_eq!(parse_count("params", "25_557_032").unwrap(), 25_557_032);
        assert_eq!(parse_count("params", "2.5e6").unwrap(), 2_500_000);
    }

    #[test]
    fn rejects_garbage_naming_the_field() {
        for bad in ["", "abc", "-3M", "NaN", "inf", "0"] {
            let message = parse_count("params", bad).unwrap_err().to_string();
            assert!(message.contains("params"), "{bad}: {message}");
        }
    }

    #[test]
    fn formats_readably() {
        assert_eq!(format_count(11_689_512), "11.69M");
        assert_eq!(format_count(1_818_075_616), "1.82G");
    }
}

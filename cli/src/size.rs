//! Sizes and offsets as qemu-img and qemu-io accept them: plain bytes (decimal or `0x` hex) or a
//! number with a `k`, `M`, `G` or `T` suffix (powers of 1024, fractions allowed); and integer
//! options as qemu-img checks them.

use crate::source::Failure;

/// Parses `512`, `0x200`, `4k`, `1.5M`, `2G`, `1T` (a trailing `b`/`B` means bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let invalid = || format!("invalid size {text:?}");
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| invalid());
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() {
        return Err(invalid());
    }
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(invalid()),
    };
    if let Ok(n) = number.parse::<u64>() {
        return n.checked_mul(1u64 << shift).ok_or_else(invalid);
    }
    let value: f64 = number.parse().map_err(|_| invalid())?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 || bytes.fract() != 0.0 {
        return Err(invalid());
    }
    Ok(bytes as u64)
}

/// qemu's `qemu_strtoul`-style integer (base 0: `0x` hex, leading-0 octal, else decimal) checked
/// against `[min, max]`, with qemu-img's two messages.
pub fn int_arg(name: &str, text: &str, min: u64, max: u64) -> Result<u64, Failure> {
    let range = || {
        Failure::new(
            1,
            format!("Invalid {name} specified. Must be between {min} and {max}."),
        )
    };
    let invalid = || Failure::new(1, format!("Invalid {name} specified: '{text}'."));
    let s = text.trim_start();
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (radix, body) = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        (16, hex)
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, &digits[1..])
    } else {
        (10, digits)
    };
    if body.is_empty() || !body.chars().all(|c| c.is_digit(radix)) {
        return Err(invalid());
    }
    let value = u64::from_str_radix(body, radix).map_err(|_| range())?;
    if (negative && value != 0) || value < min || value > max {
        return Err(range());
    }
    Ok(value)
}

/// qemu-img's `cvtnum_full`: a size with an optional suffix, checked against `[min, max]`.
pub fn size_arg(name: &str, text: &str, min: u64, max: u64) -> Result<u64, Failure> {
    let range = || {
        Failure::new(
            1,
            format!("Invalid {name} specified. Must be between {min} and {max}."),
        )
    };
    if text.trim_start().starts_with('-') {
        return Err(range());
    }
    match parse_size(text) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(_) => Err(range()),
        // All digits yet unparsable: the number overflowed.
        Err(_) if !text.is_empty() && text.trim().chars().all(|c| c.is_ascii_digit()) => {
            Err(range())
        }
        Err(_) => Err(Failure::new(
            1,
            format!("Invalid {name} specified: '{text}'."),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::{int_arg, parse_size, size_arg, Failure};

    #[test]
    fn plain_and_suffixed_sizes_parse_as_powers_of_1024() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("0x200"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("100b"), Ok(100));
    }

    #[test]
    fn garbage_and_overflow_are_refused() {
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("12q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("0.3").is_err());
        assert!(parse_size("99999999999999E").is_err());
        assert!(parse_size("0xzz").is_err());
    }

    #[test]
    fn integer_and_size_options_parse_with_qemu_img_messages() {
        assert_eq!(int_arg("x", "0x10", 1, 100).unwrap(), 16);
        assert_eq!(int_arg("x", "010", 1, 100).unwrap(), 8);
        assert_eq!(int_arg("x", " 3", 1, 100).unwrap(), 3);
        assert_eq!(size_arg("offset", "1.5k", 0, 1 << 40).unwrap(), 1536);
        let cases: [(Result<u64, Failure>, &str); 5] = [
            (
                int_arg("request count", "-1", 1, 9),
                "Invalid request count specified. Must be between 1 and 9.",
            ),
            (
                int_arg("request count", "4k", 1, 9),
                "Invalid request count specified: '4k'.",
            ),
            (
                int_arg("x", "99999999999999999999999", 1, 9),
                "Invalid x specified. Must be between 1 and 9.",
            ),
            (
                size_arg("offset", "-5", 0, 9),
                "Invalid offset specified. Must be between 0 and 9.",
            ),
            (
                size_arg("buffer size", "4kB", 1, 9),
                "Invalid buffer size specified: '4kB'.",
            ),
        ];
        for (result, message) in cases {
            assert_eq!(result.unwrap_err().message, message);
        }
    }
}
